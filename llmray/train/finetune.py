"""LoRA / QLoRA fine-tuning on Ray Train, and ``llmray finetune`` / ``llmray merge``.

Flow: the driver reads and tokenises the JSONL files (every bad line reported with its number before
anything is written), then a ``TorchTrainer`` runs :func:`train_worker` on each worker: base checkpoint →
(NF4 quantisation) → LoRA layers (llmray's own, ``llmray.train.adapters``; peft's with
``lora_impl="peft"``) → AdamW on the adapter only, gradients all-reduced across workers,
length-bucketed batches chosen deterministically from the step number (so a resumed run continues on
exactly the batches it would have seen). Every ``checkpoint_every`` steps rank 0 reports a checkpoint in
the one training format (``llmray.train.loop``: adapter tensors, optimizer state, trainer_state.json; plus
the PEFT adapter dir); a restarted worker group
(``FailureConfig``) or a re-run with the same ``--out`` resumes from the latest one. Validation loss on
held-out data is measured before and after training; it is printed, written to ``metrics.jsonl`` and
reported with the final checkpoint, whose adapter the driver copies into ``--out``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmray.config import LoraConfig
from llmray.train import adapters, chat_data, peft_adapters
from llmray.train.graphs import StepGraphs
from llmray.train.harness import PRECISIONS, evaluate, resolve_precision, train_step
from llmray.train.loop import (
    LEGACY_FINETUNE_STATE,
    MODEL_FILE,
    STATE_FILE,
    build_optimizer,
    load_checkpoint,
    lr_multiplier,
    resolve_checkpoint,
    save_checkpoint,
    set_lr,
)
from llmray.train.metrics import MetricsLogger
from llmray.train.session import RaySession, Session, run_trainer

RUN_NAME = "finetune"


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs (the CLI flags, one to one)."""

    base: str
    data: str
    out: str
    val_data: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_steps: int | None = None  # default: one epoch
    num_workers: int = 1
    use_gpu: bool = False
    lr: float = 2e-4
    warmup_steps: int | None = None  # default: 5% of the steps
    batch_size: int = 8  # sequences per worker per step
    seq_len: int = 1024
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    val_fraction: float = 0.1  # held out of --data when --val-data is not given
    checkpoint_every: int = 100
    print_every: int | None = None  # steps between console progress lines (None: max_steps // 20)
    gradient_checkpointing: bool | None = None  # default: on for QLoRA
    compute_dtype: str = "auto"  # QLoRA compute dtype: the precision's (bf16 on CUDA, fp32 on CPU)
    kernels: str = "auto"  # auto (Triton on CUDA, torch elsewhere) | triton | torch
    precision: str = "auto"  # auto (bf16 base + autocast on CUDA, fp32 elsewhere) | bf16 | fp32
    lora_impl: str = "ours"  # ours (llmray.train.adapters) | peft (the fallback)
    cuda_graphs: bool = True  # forward + backward from CUDA graphs on CUDA (not with QLoRA / checkpointing)
    max_failures: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be auto, triton or torch, got {self.kernels!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.lora_impl not in ("ours", "peft"):
            raise ValueError(f"lora_impl must be ours or peft, got {self.lora_impl!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("num_workers", "batch_size", "seq_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        d = dict(d)
        d["lora"] = LoraConfig(**d["lora"])
        return cls(**d)


# --- data on the driver ---------------------------------------------------------------------------
def prepare_data(cfg: FinetuneConfig) -> tuple[dict, dict, dict[str, Any]]:
    """Validate and tokenise train/val data (raises ChatDataError listing bad lines). Returns arrays + stats."""
    from llmray.model.tokenizer import Tokenizer

    tok = Tokenizer.load(cfg.base)
    train, val, stats = chat_data.load_train_val(
        tok, cfg.data, cfg.val_data, cfg.seq_len, cfg.val_fraction, cfg.seed
    )
    if len(train) < cfg.batch_size * cfg.num_workers:
        raise ValueError(
            f"{len(train)} training examples cannot fill one step of {cfg.num_workers} worker(s) × "
            f"--batch-size {cfg.batch_size}; lower --batch-size or add data"
        )
    stats["pad_id"] = tok.pad_token_id or 0
    return chat_data.to_arrays(train), chat_data.to_arrays(val), stats


# --- the worker loop ------------------------------------------------------------------------------
def steps_per_epoch(n_examples: int, batch_size: int, world: int) -> int:
    return max(1, math.ceil(n_examples / batch_size) // world)


def batch_for_step(
    examples, step: int, cfg: FinetuneConfig, rank: int, world: int, pad_id: int, pad_multiple: int = 1
):
    """The (input_ids, targets) batch of ``rank`` at global ``step``: a pure function of the step.

    ``pad_multiple``: pad the length up to a multiple (fewer shapes for CUDA graphs; the padding's
    targets are ignored, and causal attention keeps it from touching the real tokens)."""
    spe = steps_per_epoch(len(examples), cfg.batch_size, world)
    epoch, i = divmod(step, spe)
    batches = chat_data.length_bucketed_batches(examples, cfg.batch_size, cfg.seed, epoch)
    return chat_data.collate(examples, batches[i * world + rank], pad_id, pad_multiple=pad_multiple)


def val_batches(examples, cfg: FinetuneConfig, rank: int, world: int, pad_id: int) -> list:
    """This rank's share of the validation batches (fixed order)."""
    batches = chat_data.length_bucketed_batches(examples, cfg.batch_size, cfg.seed, 0, shuffle=False)
    return [chat_data.collate(examples, idx, pad_id) for idx in batches[rank::world]]


def build_model(cfg: FinetuneConfig, device: torch.device):
    """Base checkpoint → (NF4) → LoRA layers (ours, or peft's with ``lora_impl="peft"``) on ``device``.

    The frozen base takes the compute dtype (bf16 on CUDA by default); adapters are fp32."""
    from llmray.model.checkpoint import load_model

    dtype = resolve_precision(cfg.precision, device)
    base = load_model(cfg.base, device="cpu", dtype=dtype, kernels=cfg.kernels)
    gc = cfg.lora.qlora if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    compute = cfg.compute_dtype if cfg.compute_dtype != "auto" else str(dtype).removeprefix("torch.")
    if cfg.lora_impl == "peft":
        return peft_adapters.apply_lora(base, cfg.lora, device, compute, gradient_checkpointing=gc).train()
    if cfg.lora.qlora:
        peft_adapters.quantize_nf4(base, device, peft_adapters.resolve_compute_dtype(device, compute))
    model = adapters.apply_lora(base.to(device), cfg.lora)
    if gc:
        model.gradient_checkpointing_enable()
    return model.train()


GRAPH_PAD_MULTIPLE = 64  # batch lengths rounded up to this under CUDA graphs (one graph per shape)


def model_uses_checkpointing(model) -> bool:
    """Gradient checkpointing on (ours or peft's model): its recompute stays eager, no CUDA graphs."""
    inner = getattr(getattr(model, "base_model", None), "model", model)
    return bool(
        getattr(inner, "gradient_checkpointing", False) or getattr(model, "gradient_checkpointing", False)
    )


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The trainable tensors under peft's file names, whichever implementation trains them."""
    return (
        adapters.adapter_state(model) if adapters.lora_modules(model) else peft_adapters.adapter_state(model)
    )


def _write_adapter(model, path: Path, base: str) -> None:
    if adapters.lora_modules(model):
        adapters.save_adapter(model, path, base)
    else:
        peft_adapters.save_adapter(model, path, base)


def _resume(path: Path, model, opt) -> dict:
    """The trainer state of a checkpoint: the one format, or the earlier adapter/ + state.json one."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    if (path / LEGACY_FINETUNE_STATE).exists() and not (path / STATE_FILE).exists():
        if adapters.lora_modules(model):
            raise ValueError(
                f"{path} is a fine-tuning checkpoint of the earlier format; resume it with --lora-impl peft "
                "(which reads it), or start a new run from its adapter/ directory"
            )
        return peft_adapters.load_training_state(path, model, opt)
    state = load_checkpoint(path, model, opt, weights=False)
    tensors = load_file(str(path / MODEL_FILE))
    if adapters.lora_modules(model):
        adapters.load_adapter_state(model, tensors)
    else:
        peft_adapters.load_adapter_state(model, tensors)
    return state


def _grad_all_reduce(params: list[torch.Tensor], world: int) -> None:
    """Average the adapter gradients over workers: one all-reduce over a flat buffer."""
    if world == 1:
        return
    grads = []
    for p in params:
        assert p.grad is not None, "every trainable adapter parameter has a gradient after backward"
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    for g, avg in zip(grads, flat.div_(world).split([g.numel() for g in grads]), strict=True):
        g.copy_(avg.view_as(g))


def train_loop(config: dict, session: Session) -> dict:
    """One worker's fine-tuning loop (Ray Train's train_loop_per_worker body). Returns final metrics."""
    cfg = FinetuneConfig.from_dict(config["cfg"])
    train = chat_data.from_arrays(config["train"])
    val = chat_data.from_arrays(config["val"])
    pad_id, rank, world, device = config["pad_id"], session.rank, session.world, session.device
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    dtype = resolve_precision(cfg.precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)  # adapters only
    total = cfg.max_steps or steps_per_epoch(len(train), cfg.batch_size, world)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20)
    trainable, all_params = peft_adapters.trainable_parameters(model)
    val_b = val_batches(val, cfg, rank, world, pad_id)
    graphs = None
    if cfg.cuda_graphs and device.type == "cuda" and not model_uses_checkpointing(model):
        graphs = StepGraphs(model, params, device, dtype, max_graphs=8)
    pad_multiple = GRAPH_PAD_MULTIPLE if graphs is not None else 1
    with session.resume_dir() as resume:
        state: dict[str, Any] = _resume(resume, model, opt) if resume is not None else {"step": 0}
    logger = MetricsLogger(config.get("metrics_file"), total, state["step"], rank == 0, cfg.print_every)
    if resume is not None:
        logger.log({"event": "resumed", "step": state["step"], "from": str(resume)}, console=False)
        print(f"resumed from {resume} at step {state['step']}", flush=True)
    else:
        state["val_loss_before"] = evaluate(model, val_b, device, dtype, world)["val_loss"]
        logger.log({"event": "val", "step": 0, "val_loss": state["val_loss_before"],
                    "val_loss_before": state["val_loss_before"], "trainable_params": trainable,
                    "total_params": all_params})  # fmt: skip
    step, t0, tokens = state["step"], time.perf_counter(), 0
    metrics: dict[str, Any] | None = None
    while step < total:
        if config.get("fail_at_step") == step and not Path(config["fail_marker"]).exists():
            Path(config["fail_marker"]).write_text("failed once")  # test hook: one injected crash
            raise RuntimeError(f"injected failure at step {step}")
        ids, tgt = batch_for_step(train, step, cfg, rank, world, pad_id, pad_multiple)
        set_lr(opt, lr_multiplier(step, total, warmup, "cosine", min_lr_ratio=0.1))
        loss, gnorm = train_step(
            model, [(ids.to(device), tgt.to(device))], 1, opt, params, device, dtype, cfg.grad_clip,
            after_backward=lambda: _grad_all_reduce(params, world), graphs=graphs,
        )  # fmt: skip
        step += 1
        tokens += ids.numel()
        record = {"step": step, "loss": round(loss.item(), 5), "grad_norm": round(float(gnorm), 4),
                  "lr": opt.param_groups[0]["lr"],
                  "tokens_per_s": round(tokens * world / (time.perf_counter() - t0), 1)}  # fmt: skip
        val_after = evaluate(model, val_b, device, dtype, world)["val_loss"] if step == total else None
        if val_after is not None:  # the last step's one console line carries its validation loss
            record["val_loss"] = val_after
        logger.log(record)
        if step % cfg.checkpoint_every == 0 or step == total:
            state["step"] = step
            metrics = {"step": step, "loss": loss.item(), "val_loss_before": state["val_loss_before"]}
            if val_after is not None:
                metrics["val_loss_after"] = val_after
                metrics.update(trainable_params=trainable, total_params=all_params)
                logger.log({"event": "val", "val_loss": val_after, **metrics}, console=False)
            _checkpoint(session, model, opt, {**state, "metrics": metrics}, cfg.base)
    return metrics if metrics is not None else state.get("metrics", {})


def _checkpoint(session: Session, model, opt, state: dict, base: str) -> None:
    """The one checkpoint format with the adapter tensors as the model file, plus the PEFT adapter dir."""

    def write(d: Path) -> None:
        extra = lambda tmp: _write_adapter(model, tmp / "adapter", base)  # noqa: E731
        save_checkpoint(d, model, opt, state, model_state=adapter_tensors(model), extra=extra)

    session.checkpoint(state["metrics"], write)


def train_worker(config: dict) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    train_loop(config, RaySession())


# --- the driver -----------------------------------------------------------------------------------
def run_finetune(cfg: FinetuneConfig, fail_at_step: int | None = None) -> dict[str, Any]:
    """Validate data, run the TorchTrainer, copy the final adapter into ``cfg.out``; returns its metrics.

    Bad data raises before ``cfg.out`` is created. ``fail_at_step`` injects one worker crash (tests).
    """
    from llmray.model.checkpoint import load_config

    load_config(cfg.base)  # a clear error for a wrong --base before reading the data
    train, val, stats = prepare_data(cfg)
    out = Path(cfg.out).resolve()
    if (out / "adapter_config.json").exists() and not (out / "ray" / RUN_NAME).exists():
        raise FileExistsError(f"{out} already holds an adapter from another run; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"fine-tuning {cfg.base} on {stats['train']['examples']} examples "
        f"({stats['train']['loss_tokens']} loss tokens, {stats['train']['truncated_to_seq_len']} truncated to "
        f"{cfg.seq_len}); validation: {stats['val_source']}",
        flush=True,
    )
    config = {
        "cfg": cfg.to_dict(),
        "train": train,
        "val": val,
        "pad_id": stats["pad_id"],
        "metrics_file": str(out / "metrics.jsonl"),
    }
    if fail_at_step is not None:
        config.update(fail_at_step=fail_at_step, fail_marker=str(out / ".injected_failure"))
    from llmray.train.ray_env import init_ray

    init_ray(out / "ray.log", gpus=cfg.num_workers if cfg.use_gpu else 0)  # Ray's own logs into a file
    result = run_trainer(
        train_worker, config, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
        cpus_per_worker=1.0 if cfg.use_gpu else 0.5, name=RUN_NAME, storage_path=str(out / "ray"),
        max_failures=cfg.max_failures,
    )  # fmt: skip
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning finished without a checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as ckpt:
        state = json.loads((Path(ckpt) / STATE_FILE).read_text())["trainer"]
        metrics = {**state["metrics"], "data": stats, "lora": asdict(cfg.lora), "base": str(cfg.base)}
        _publish_adapter(Path(ckpt) / "adapter", out, metrics)
    print(
        f"validation loss {metrics['val_loss_before']:.4f} -> {metrics['val_loss_after']:.4f} "
        f"after {metrics['step']} steps; adapter written to {out}",
        flush=True,
    )
    return metrics


def _publish_adapter(adapter: Path, out: Path, metrics: dict) -> None:
    """Copy the adapter files into ``out`` (each via a temporary name) and write llmray.json."""
    for name in peft_adapters.ADAPTER_FILES:
        tmp = out / f".{name}.tmp"
        shutil.copy2(adapter / name, tmp)
        os.replace(tmp, out / name)
    tmp = out / ".llmray.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    os.replace(tmp, out / "llmray.json")
    with (out / "metrics.jsonl").open("a") as f:
        f.write(
            json.dumps({"event": "final", **{k: metrics[k] for k in metrics if k not in ("data",)}}) + "\n"
        )
