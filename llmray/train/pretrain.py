"""Pretraining on Ray Train V2: ``TorchTrainer`` over Ray Data shards, Muon, resumable checkpoints.

The driver (``run_pretrain``) reads and tokenizes the corpus with Ray Data (training a tokenizer first
when none is given), splits it 90/10, builds the packed-window dataset and starts a ``TorchTrainer``
(``ScalingConfig(num_workers, use_gpu)``, ``RunConfig(name, storage_path, FailureConfig(max_failures))``).
Each worker (``train_worker``) runs ``train_steps``: DDP (or FSDP2 with ``parallel="fsdp"``,
``llmray.train.fsdp``) when more than one worker, bf16 autocast on GPU, optional ``torch.compile``,
gradient accumulation, warmup + cosine/WSD, gradient clipping, periodic validation, and every
``checkpoint_every`` steps ``ray.train.report`` with a checkpoint holding model, optimizer (Muon
momentum included), schedule, step and data position (safetensors + JSON). A restarted worker group
(``max_failures``) or a re-run with the same output directory resumes from the latest checkpoint: the
data shard skips the batches already consumed, so the loss curve continues unchanged.
Finally the driver writes the model as a Hugging Face Qwen3 directory with its tokenizer into ``out``,
next to ``metrics.jsonl`` (rank 0, every step) and ``loss_curve.png``.

``train_steps`` also runs without Ray (``run_local``: one process, same rows as one Ray worker), which
the speed benchmark uses to leave Ray's start-up out of its clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmray.config import ModelConfig
from llmray.train import data as D
from llmray.train import fsdp as P
from llmray.train.fsdp import PARALLEL_MODES
from llmray.train.loop import (
    MetricsLogger,
    autocast_context,
    build_optimizer,
    evaluate_windows,
    load_checkpoint,
    lr_multiplier,
    mfu,
    plot_loss_curve,
    read_metrics,
    save_checkpoint,
    set_lr,
)


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; field names are the CLI's long flags (``-`` for ``_``)."""

    data: str = ""
    out: str = ""
    preset: str = "shakespeare-char"
    tokenizer: str = "char"  # char | bpe | DIR holding tokenizer.json
    bpe_vocab: int = 8192
    text_field: str = "text"
    val_fraction: float = 0.1
    max_steps: int = 1000
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional, so Ray Data keeps CPUs next to the workers
    optimizer: str = "muon"
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per block; llmray.train.fsdp)
    seq_len: int = 256
    batch_size: int = 64  # sequences per optimizer step per worker (micro_batch_size * grad_accum)
    grad_accum: int = 1
    lr: float = 3e-3  # AdamW lr (embeddings, norms, head; everything with --optimizer adamw)
    muon_lr: float = 0.02
    weight_decay: float = 0.0
    warmup_steps: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 512  # validation windows per evaluation (from the start of the split)
    checkpoint_every: int = 200
    log_every: int = 1
    seed: int = 0
    compile: bool = False
    kernels: str = "auto"
    name: str = "pretrain"
    storage_path: str | None = None  # default: <out>/ray_results
    max_failures: int = 0
    target_val_loss: float | None = None  # stop once validation reaches it (benchmarks)
    fail_at_step: int | None = None  # testing: the first attempt raises at this step
    fail_kill: bool = False  # testing: at fail_at_step, SIGKILL the rank-0 worker process instead of raising

    def __post_init__(self) -> None:
        if not self.data or not self.out:
            raise ValueError("pretraining needs --data PATH|GLOB and --out DIR")
        if self.optimizer not in ("muon", "adamw"):
            raise ValueError(f"--optimizer must be muon or adamw, got {self.optimizer!r}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"--parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}"
            )
        for name in ("max_steps", "num_workers", "seq_len", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum


# --- the per-worker loop ----------------------------------------------------------------------------------
def train_steps(
    cfg: PretrainConfig,
    model_config: ModelConfig,
    batches: Iterator[torch.Tensor],
    val_tokens: np.ndarray,
    device: torch.device,
    resume_dir: str | None,
    report: Callable[[dict[str, Any], str | None], None],
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """Train from step 0 or from ``resume_dir``; ``report(metrics, checkpoint_dir_or_None)`` at checkpoints."""
    from llmray.model.qwen3 import Qwen3ForCausalLM

    torch.manual_seed(cfg.seed)  # every rank draws the same initial weights
    model = Qwen3ForCausalLM(model_config, kernels=cfg.kernels).to(device)
    fsdp = cfg.parallel == "fsdp" and world > 1
    state: dict[str, Any] = {"step": 0, "batches_consumed": 0, "elapsed_s": 0.0}
    if resume_dir is not None:
        state = load_checkpoint(resume_dir, model, None)  # weights first: FSDP2 shards the loaded model
    if state["step"] >= cfg.max_steps:  # a re-run of a finished run (same output directory): nothing left
        return {"step": state["step"]}
    compile_mode = ("blocks" if fsdp else "model") if cfg.compile else "none"
    train_fwd = P.parallelize(model, cfg.parallel, world, device, compile_mode)
    fwd = train_fwd._orig_mod if compile_mode == "model" else train_fwd  # type: ignore[union-attr]
    opt = build_optimizer(model, cfg.optimizer, lr=cfg.lr, muon_lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
    if resume_dir is not None:
        load_checkpoint(resume_dir, model, opt, weights=False)
    step = state["step"]
    for _ in range(state["batches_consumed"]):  # Ray Data iterators cannot seek: replay the order, drop
        _next_batch(batches, state["batches_consumed"])
    consumed = state["batches_consumed"]
    val_win = D.val_windows(val_tokens, cfg.seq_len, cfg.eval_windows)
    logger = MetricsLogger(
        Path(cfg.out) / "metrics.jsonl", cfg.max_steps, resume_step=step, enabled=rank == 0
    )
    tokens_per_step = cfg.batch_size * cfg.seq_len * world
    t_start, t_log, log_step = time.perf_counter(), time.perf_counter(), step
    elapsed0 = state.get("elapsed_s", 0.0)
    model.train()
    last: dict[str, Any] = {}
    while step < cfg.max_steps:
        mult = lr_multiplier(step, cfg.max_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
        set_lr(opt, mult)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            batch = _next_batch(batches, consumed)  # (B, T + 1)
            consumed += 1
            sync = world == 1 or micro == cfg.grad_accum - 1
            ctx = fwd.no_sync() if not (sync or fsdp) else contextlib.nullcontext()  # type: ignore[operator]
            if fsdp:
                P.set_gradient_sync(model, sync)
            with ctx, autocast_context(device):
                loss = train_fwd(batch[:, :-1], targets=batch[:, 1:]) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if cfg.fail_at_step is not None and step == cfg.fail_at_step and rank == 0:
            marker = Path(cfg.out) / ".injected_failure"
            if not marker.exists():
                marker.write_text("1")
                if cfg.fail_kill:  # a hard crash of the worker process: no exception, no cleanup
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure at step {step} (fail_at_step, for tests)")
        record: dict[str, Any] = {}
        is_eval = step % cfg.eval_every == 0 or step == cfg.max_steps
        is_ckpt = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
        if step % cfg.log_every == 0 or is_eval or is_ckpt:
            if world > 1:
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
            now = time.perf_counter()
            tok_s = tokens_per_step * (step - log_step) / max(now - t_log, 1e-9)
            t_log, log_step = now, step
            record = {
                "step": step,
                "loss": loss_sum.item(),
                "lr": opt.param_groups[0]["lr"],
                "grad_norm": P.to_float(grad_norm),
                "tokens_per_s": tok_s,
                "mfu": mfu(tok_s, model_config, cfg.seq_len) if device.type == "cuda" else 0.0,
                "tokens": step * tokens_per_step,
                "elapsed_s": elapsed0 + now - t_start,
            }
        if is_eval:
            record.update(evaluate_windows(model, val_win, cfg.micro_batch_size, device, lockstep=fsdp))
            record["elapsed_s"] = elapsed0 + time.perf_counter() - t_start
        reached = cfg.target_val_loss is not None and record.get("val_loss", 1e9) <= cfg.target_val_loss
        if record:
            logger.log(record)
            last = record
        if is_ckpt or reached:
            state = {
                "step": step,
                "batches_consumed": consumed,
                "elapsed_s": elapsed0 + time.perf_counter() - t_start,
                "seed": cfg.seed,
                "lr_multiplier": mult,
                "schedule": cfg.schedule,
                "max_steps": cfg.max_steps,
            }
            # FSDP2: every rank joins the gathers; rank 0 writes the same plain files as without sharding
            full = (P.full_model_tensors(model), P.full_optimizer_state(opt)) if fsdp else (None, None)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt_dir = None
                if rank == 0:
                    ckpt_dir = str(save_checkpoint(Path(tmp) / "checkpoint", model, opt, state, *full))
                report(dict(last, step=step), ckpt_dir)
        if reached:
            break
    return last


def _next_batch(batches: Iterator[torch.Tensor], consumed: int) -> torch.Tensor:
    try:
        return next(batches)
    except StopIteration:
        raise RuntimeError(
            f"the training data ran out after {consumed} batches: the dataset holds max_steps * batch_size "
            "rows per worker, so a resumed run must not use a smaller --max-steps than its checkpoint's step"
        ) from None


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train V2 entry point of every worker."""
    import ray.train
    import ray.train.torch

    cfg = PretrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    batches = iter(
        shard.iter_torch_batches(
            batch_size=cfg.micro_batch_size,
            dtypes=torch.int64,
            device=device,
            drop_last=True,
            prefetch_batches=4,
        )
    )
    batches = (b["tokens"] for b in batches)
    checkpoint = ray.train.get_checkpoint()
    resume_ctx = checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(None)

    def report(metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    with resume_ctx as resume_dir:
        train_steps(
            cfg,
            ModelConfig(**config["model_config"]),
            batches,
            config["val_tokens"],
            device,
            resume_dir,
            report,
            rank,
            world,
        )


# --- the driver -------------------------------------------------------------------------------------------
def prepare_corpus(cfg: PretrainConfig) -> tuple[Any, ModelConfig, np.ndarray, np.ndarray]:
    """Tokenizer (reused from ``out`` on resume, loaded, or trained), model config, train/val token streams."""
    from llmray.model.tokenizer import Tokenizer, char_tokenizer, train_bpe

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = D.resolve_paths(cfg.data)
    ds = D.read_documents(paths, cfg.text_field)
    trained_here = cfg.tokenizer in ("char", "bpe")
    if (out / "tokenizer.json").exists():
        tok = Tokenizer.load(out)  # a run in this directory already chose (or trained) it: keep ids stable
    elif cfg.tokenizer == "char":
        tok = char_tokenizer("".join(D.corpus_texts(ds)))
    elif cfg.tokenizer == "bpe":
        tok = train_bpe(D.corpus_texts(ds, max_chars=200_000_000), vocab_size=cfg.bpe_vocab)
    elif Path(cfg.tokenizer).is_dir():
        tok = Tokenizer.load(cfg.tokenizer)
    else:
        raise ValueError(
            f"--tokenizer must be char, bpe or a directory with tokenizer.json, got {cfg.tokenizer!r}"
        )
    tok.save(out)
    add_eos = len(paths) > 1 or D.file_format(paths[0]) != "text"
    tokens = D.tokenize_corpus(ds, tok, add_eos=add_eos)
    train, val = D.split_tokens(tokens, cfg.val_fraction)
    mc = ModelConfig.preset(cfg.preset)
    if trained_here:
        mc = mc.replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, bos_token_id=None)
    elif tok.vocab_size > mc.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} tokens but preset {cfg.preset} only {mc.vocab_size}"
        )
    return tok, mc, train, val


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) pretraining on Ray Train; returns the last metrics and where results went."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # the default in Ray 2.60; explicit for older Rays
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llmray.train.ray_env import init_ray

    # RAY_ADDRESS (a `ray job submit` job) or a local embedded Ray; Ray's own logs into OUT/ray.log
    init_ray(Path(cfg.out).resolve() / "ray.log", gpus=cfg.num_workers if cfg.use_gpu else 0)
    tok, mc, train_tokens, val_tokens = prepare_corpus(cfg)
    datasets = D.train_windows_datasets(
        train_tokens,
        cfg.seq_len,
        cfg.seed,
        cfg.max_steps * cfg.batch_size,
        cfg.num_workers,
        cfg.micro_batch_size,
    )
    out = Path(cfg.out).resolve()
    cfg = dataclasses.replace(cfg, out=str(out))
    storage = cfg.storage_path or str(out / "ray_results")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": dataclasses.asdict(cfg),
            "model_config": mc.to_dict(),
            "val_tokens": val_tokens,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        # one dataset per worker, not split: each worker's rows are fixed (resume skips the consumed ones)
        dataset_config=DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as ckpt:
        export_model(ckpt, mc, tok, out)
    metrics = read_metrics(out / "metrics.jsonl")
    plot_loss_curve({cfg.optimizer: metrics}, out / "loss_curve.png", title=f"{cfg.preset} on {cfg.data}")
    return {
        "out": str(out),
        "checkpoint": result.checkpoint.path,
        "metrics_file": str(out / "metrics.jsonl"),
        "loss_curve": str(out / "loss_curve.png"),
        "last": metrics[-1] if metrics else {},
    }


def export_model(checkpoint_dir: str | Path, mc: ModelConfig, tokenizer: Any, out: str | Path) -> Path:
    """Write a training checkpoint's weights as a Hugging Face Qwen3 directory (with the tokenizer)."""
    from llmray.model.checkpoint import save_model
    from llmray.model.qwen3 import Qwen3ForCausalLM

    model = Qwen3ForCausalLM(mc, kernels="torch")
    load_checkpoint(checkpoint_dir, model, None)
    return save_model(model, out, tokenizer=tokenizer, dtype=torch.float32)


def run_local(cfg: PretrainConfig, device: str | torch.device = "cuda") -> dict[str, Any]:
    """One process, no Ray (benchmarks): same tokenization, rows and loop as one Ray Train worker."""
    device = torch.device(device)
    tok, mc, train_tokens, val_tokens = prepare_corpus(cfg)
    checkpoints = Path(cfg.out) / "checkpoints"

    def report(metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        if ckpt_dir:  # keep the latest checkpoint (already complete: save_checkpoint renames atomically)
            shutil.rmtree(checkpoints / "latest", ignore_errors=True)
            shutil.copytree(ckpt_dir, checkpoints / "latest")

    batches = D.local_batches(train_tokens, cfg.seq_len, cfg.seed, cfg.micro_batch_size, device=device)
    t0 = time.perf_counter()
    last = train_steps(cfg, mc, batches, val_tokens, device, None, report)
    return {"last": last, "wall_s": time.perf_counter() - t0, "model_config": mc, "tokenizer": tok}
