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

The loop (``train_steps``: ``build_worker``, then ``run_step`` per step, evaluation, ``_checkpoint``) sees
its runtime only through a ``llmray.train.session.Session``: ``RaySession`` in a Ray Train worker,
``LocalSession`` in one process (tests; benchmarks that keep Ray's start-up off the clock). Precision,
autocast, the step and evaluation are ``llmray.train.harness``'s, shared with fine-tuning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmray.config import ModelConfig
from llmray.train import data as train_data
from llmray.train import fsdp as parallelism
from llmray.train.data import prepare_corpus
from llmray.train.fsdp import PARALLEL_MODES
from llmray.train.graphs import StepGraphs
from llmray.train.harness import PRECISIONS, evaluate, resolve_precision, train_step
from llmray.train.loop import (
    build_optimizer,
    export_model,
    load_checkpoint,
    lr_multiplier,
    save_checkpoint,
    set_lr,
)
from llmray.train.metrics import MetricsLogger, mfu, plot_loss_curve, read_metrics
from llmray.train.session import RaySession, Session, run_trainer
from llmray.train.warmup import WarmupClock, precompile_while_fetching

if TYPE_CHECKING:
    from llmray.model.qwen3 import Qwen3ForCausalLM


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
    print_every: int | None = None  # steps between console progress lines (None: max_steps // 20)
    seed: int = 0
    compile: bool = False
    cuda_graphs: bool = True  # forward + backward replayed from CUDA graphs (one GPU worker, no compile)
    compile_ahead: bool = True  # Triton: the first step's kernels compiled ahead on threads (warmup.py)
    kernels: str = "auto"  # auto (Triton on CUDA, torch elsewhere) | triton | torch
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp32
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
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"--kernels must be auto, triton or torch, got {self.kernels!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
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
@dataclass
class _Worker:
    """One worker's training state between steps."""

    model: Qwen3ForCausalLM  # the plain model (parameters, evaluation, checkpoints)
    train_fwd: Any  # what the step calls: the model, DDP or compiled
    ddp: Any  # the DDP wrapper (no_sync) or None
    fsdp: bool
    opt: torch.optim.Optimizer
    dtype: torch.dtype  # compute dtype (autocast)
    state: dict[str, Any]  # step, batches_consumed, elapsed_s (the checkpoint's trainer state)
    graphs: StepGraphs | None = None  # CUDA-graphed forward + backward (one GPU worker, no compile)


def build_worker(
    cfg: PretrainConfig, model_config: ModelConfig, session: Session, resume: Path | None
) -> _Worker:
    """Model (same initial weights on every rank), parallel wrapper, optimizer; restored from ``resume``."""
    from llmray.model.qwen3 import Qwen3ForCausalLM

    device, world = session.device, session.world
    torch.manual_seed(cfg.seed)  # every rank draws the same initial weights
    model = Qwen3ForCausalLM(model_config, kernels=cfg.kernels).to(device)
    fsdp = cfg.parallel == "fsdp" and world > 1
    state: dict[str, Any] = {"step": 0, "batches_consumed": 0, "elapsed_s": 0.0}
    if resume is not None:
        state = load_checkpoint(resume, model, None)  # weights first: FSDP2 shards the loaded model
    compile_mode = ("blocks" if fsdp or model.ops.name == "triton" else "model") if cfg.compile else "none"
    train_fwd = parallelism.parallelize(model, cfg.parallel, world, device, compile_mode)
    fwd = train_fwd._orig_mod if compile_mode == "model" else train_fwd
    assert isinstance(fwd, torch.nn.Module), "torch.compile keeps the module it wraps as _orig_mod"
    opt = build_optimizer(model, cfg.optimizer, lr=cfg.lr, muon_lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
    if resume is not None:
        load_checkpoint(resume, model, opt, weights=False)
    ddp = fwd if world > 1 and not fsdp else None
    dtype = resolve_precision(cfg.precision, device)
    graphs = None
    if cfg.cuda_graphs and device.type == "cuda" and world == 1 and compile_mode == "none":
        graphs = StepGraphs(model, list(model.parameters()), device, dtype, accumulate=cfg.grad_accum > 1)
    return _Worker(model, train_fwd, ddp, fsdp, opt, dtype, state, graphs)


def run_step(w: _Worker, cfg: PretrainConfig, batches: Iterator[torch.Tensor], world: int) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-batches; gradients synchronised on the last one."""
    mult = lr_multiplier(w.state["step"], cfg.max_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
    set_lr(w.opt, mult)

    def micro_batches():
        for _ in range(cfg.grad_accum):
            batch = _next_batch(batches, w.state["batches_consumed"])  # (B, T + 1)
            w.state["batches_consumed"] += 1
            yield batch[:, :-1], batch[:, 1:]

    def sync_context(i: int):
        sync = world == 1 or i == cfg.grad_accum - 1
        if w.fsdp:
            parallelism.set_gradient_sync(w.model, sync)
        return w.ddp.no_sync() if w.ddp is not None and not sync else contextlib.nullcontext()

    loss, grad_norm = train_step(
        w.train_fwd, micro_batches(), cfg.grad_accum, w.opt, list(w.model.parameters()),
        w.model.lm_head.weight.device, w.dtype, cfg.grad_clip, before_backward=sync_context, graphs=w.graphs,
    )  # fmt: skip
    w.state["step"] += 1
    w.state["lr_multiplier"] = mult
    return {"loss": loss, "grad_norm": grad_norm}


def _maybe_fail(cfg: PretrainConfig, step: int, rank: int) -> None:
    """Testing: the first attempt raises (or SIGKILLs itself) at ``fail_at_step``, once its record is
    logged; the marker file keeps the metrics it logged (a resumed run replaces the steps it replays)."""
    if cfg.fail_at_step is None or step != cfg.fail_at_step or rank != 0:
        return
    marker = Path(cfg.out) / ".injected_failure"
    if not marker.exists():
        metrics = Path(cfg.out) / "metrics.jsonl"
        marker.write_text(metrics.read_text() if metrics.exists() else "")
        if cfg.fail_kill:  # a hard crash of the worker process: no exception, no cleanup
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at step {step} (fail_at_step, for tests)")


def _val_batches(val_tokens: np.ndarray, cfg: PretrainConfig, rank: int, world: int) -> tuple[list, int]:
    """This rank's validation (ids, targets) batches, and how many forwards the busiest rank runs."""
    windows = train_data.val_windows(val_tokens, cfg.seq_len, cfg.eval_windows)  # (n, T + 1)
    mine = torch.from_numpy(windows[rank::world])
    batches = [(w[:, :-1], w[:, 1:]) for w in mine.split(cfg.micro_batch_size)]
    return batches, math.ceil(math.ceil(len(windows) / world) / cfg.micro_batch_size)


def train_steps(
    cfg: PretrainConfig,
    model_config: ModelConfig,
    batches: Iterator[torch.Tensor],
    val_tokens: np.ndarray,
    session: Session,
) -> dict[str, Any]:
    """Train from step 0 or from the session's checkpoint; checkpoints go through ``session.checkpoint``."""
    rank, world, device = session.rank, session.world, session.device
    with session.resume_dir() as resume:
        w = build_worker(cfg, model_config, session, resume)
    if w.state["step"] >= cfg.max_steps:  # a re-run of a finished run (same output directory): nothing left
        return {"step": w.state["step"]}
    for _ in range(w.state["batches_consumed"]):  # Ray Data iterators cannot seek: replay the order, drop
        _next_batch(batches, w.state["batches_consumed"])
    val, n_val = _val_batches(val_tokens, cfg, rank, world)
    logger = MetricsLogger(
        Path(cfg.out) / "metrics.jsonl", cfg.max_steps, w.state["step"], rank == 0, cfg.print_every
    )
    tokens_per_step = cfg.batch_size * cfg.seq_len * world
    clock = WarmupClock(device).start()  # Triton compiles and the first steps, until the first evaluation
    t_start = t_log = time.perf_counter()
    log_step, elapsed0 = w.state["step"], w.state.get("elapsed_s", 0.0)
    w.model.train()
    last: dict[str, Any] = {}
    if cfg.compile_ahead and device.type == "cuda" and w.model.ops.name == "triton" and world == 1:
        first, clock.marks["compile_ahead"] = precompile_while_fetching(
            w.model, w.opt, lambda: _next_batch(batches, w.state["batches_consumed"]),
            (cfg.micro_batch_size, cfg.seq_len + 1), device, w.dtype,
        )  # fmt: skip
        batches = itertools.chain([first], batches)  # the first batch, handed back to the loop
    gc.collect()
    gc.freeze()  # the set-up's objects (model, Triton, Ray) out of the collector's scans: no long pauses later
    try:
        while w.state["step"] < cfg.max_steps:
            out = run_step(w, cfg, batches, world)
            clock.step_done()
            step = w.state["step"]
            is_eval = step % cfg.eval_every == 0 or step == cfg.max_steps
            is_ckpt = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
            record: dict[str, Any] = {}
            if step % cfg.log_every == 0 or is_eval or is_ckpt:
                if world > 1:
                    torch.distributed.all_reduce(out["loss"], op=torch.distributed.ReduceOp.AVG)
                now = time.perf_counter()
                tok_s = tokens_per_step * (step - log_step) / max(now - t_log, 1e-9)
                t_log, log_step = now, step
                record = {
                    "step": step, "loss": out["loss"].item(), "lr": w.opt.param_groups[0]["lr"],
                    "grad_norm": parallelism.to_float(out["grad_norm"]), "tokens_per_s": tok_s,
                    "mfu": mfu(tok_s, model_config, cfg.seq_len) if device.type == "cuda" else 0.0,
                    "tokens": step * tokens_per_step, "elapsed_s": elapsed0 + now - t_start,
                }  # fmt: skip
                if w.graphs is not None:
                    record["cuda_graph_replays"] = w.graphs.replays
            if is_eval:
                lockstep = n_val if w.fsdp else None
                t_eval = time.perf_counter()
                record.update(evaluate(w.model, val, device, w.dtype, world, lockstep))
                record["elapsed_s"] = elapsed0 + time.perf_counter() - t_start
                clock.first_eval_done(
                    record, t_eval, t_start, Path(cfg.out) / "warmup.json" if rank == 0 else None
                )
            elif record and clock.active:
                record.update(clock.record_fields())
            reached = cfg.target_val_loss is not None and record.get("val_loss", 1e9) <= cfg.target_val_loss
            if record:
                logger.log(record)
                last = record
            _maybe_fail(cfg, step, rank)  # after the step's record, before its checkpoint
            if is_ckpt or reached:
                w.state["elapsed_s"] = elapsed0 + time.perf_counter() - t_start
                _checkpoint(w, cfg, session, dict(last, step=step))
            if reached:
                break
    finally:
        clock.stop()
    return last


def _checkpoint(w: _Worker, cfg: PretrainConfig, session: Session, metrics: dict[str, Any]) -> None:
    """Every rank joins the FSDP2 gathers; rank 0 writes the plain single-device format."""
    state = {**w.state, "seed": cfg.seed, "schedule": cfg.schedule, "max_steps": cfg.max_steps}
    full = (
        (parallelism.full_model_tensors(w.model), parallelism.full_optimizer_state(w.opt))
        if w.fsdp
        else (None, None)
    )
    session.checkpoint(metrics, lambda d: save_checkpoint(d, w.model, w.opt, state, *full))


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
    cfg = PretrainConfig(**config["cfg"])
    session = RaySession()
    shard = session.dataset_shard(f"train_{session.rank}")
    batches = shard.iter_torch_batches(
        batch_size=cfg.micro_batch_size, dtypes=torch.int64, device=session.device, drop_last=True,
        prefetch_batches=4,
    )  # fmt: skip
    tokens = (b["tokens"] for b in batches)
    train_steps(cfg, ModelConfig(**config["model_config"]), tokens, config["val_tokens"], session)


# --- the driver -------------------------------------------------------------------------------------------
def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) pretraining on Ray Train; returns the last metrics and where results went."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # the default in Ray 2.60; explicit for older Rays
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    from llmray.train.ray_env import init_ray

    # RAY_ADDRESS (a `ray job submit` job) or a local embedded Ray; Ray's own logs into OUT/ray.log
    init_ray(Path(cfg.out).resolve() / "ray.log", gpus=cfg.num_workers if cfg.use_gpu else 0)
    tok, mc, train_tokens, val_tokens = prepare_corpus(cfg)
    datasets = train_data.train_windows_datasets(
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
    result = run_trainer(
        train_worker,
        {"cfg": dataclasses.asdict(cfg), "model_config": mc.to_dict(), "val_tokens": val_tokens},
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker,
        name=cfg.name, storage_path=storage, max_failures=cfg.max_failures, datasets=datasets,
        # one dataset per worker, not split: each worker's rows are fixed (resume skips the consumed ones)
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )  # fmt: skip
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
