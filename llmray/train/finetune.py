"""LoRA / QLoRA fine-tuning on Ray Train, and ``llmray finetune`` / ``llmray merge``.

Flow: the driver reads and tokenises the JSONL files (every bad line reported with its number before
anything is written), then a ``TorchTrainer`` runs :func:`train_worker` on each worker: base checkpoint →
(NF4 quantisation) → peft LoRA → AdamW on the adapter only, gradients all-reduced across workers,
length-bucketed batches chosen deterministically from the step number (so a resumed run continues on
exactly the batches it would have seen). Every ``checkpoint_every`` steps rank 0 reports a checkpoint
(PEFT adapter dir + optimizer state in safetensors + step in JSON); a restarted worker group
(``FailureConfig``) or a re-run with the same ``--out`` resumes from the latest one. Validation loss on
held-out data is measured before and after training; it is printed, written to ``metrics.jsonl`` and
reported with the final checkpoint, whose adapter the driver copies into ``--out``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmray.config import LoraConfig
from llmray.train import chat_data, lora
from llmray.train.loop import MetricsLogger, build_optimizer, lr_multiplier, set_lr

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
    gradient_checkpointing: bool | None = None  # default: on for QLoRA
    compute_dtype: str = "auto"  # QLoRA compute dtype: bf16 on CUDA, fp32 on CPU
    kernels: str = "auto"
    max_failures: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
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


def batch_for_step(examples, step: int, cfg: FinetuneConfig, rank: int, world: int, pad_id: int):
    """The (input_ids, targets) batch of ``rank`` at global ``step``: a pure function of the step."""
    spe = steps_per_epoch(len(examples), cfg.batch_size, world)
    epoch, i = divmod(step, spe)
    batches = chat_data.length_bucketed_batches(examples, cfg.batch_size, cfg.seed, epoch)
    return chat_data.collate(examples, batches[i * world + rank], pad_id)


@torch.no_grad()
def evaluate(model, examples, cfg: FinetuneConfig, rank: int, world: int, pad_id: int, device) -> float:
    """Token-weighted mean loss over ``examples`` (sharded over workers, sums all-reduced)."""
    was_training = model.training
    model.eval()
    batches = chat_data.length_bucketed_batches(examples, cfg.batch_size, cfg.seed, 0, shuffle=False)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss × tokens, tokens)
    for idx in batches[rank::world]:
        ids, tgt = chat_data.collate(examples, idx, pad_id)
        n = int((tgt != chat_data.IGNORE).sum())
        with autocast(device):
            loss = model(ids.to(device), targets=tgt.to(device))
        sums += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=device)
    _all_reduce(sums, world)
    model.train(was_training)
    return float(sums[0] / sums[1])


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 adapters, bf16 matmuls); a no-op context on CPU (fp32 throughout)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def _all_reduce(t: torch.Tensor, world: int) -> None:
    if world > 1:
        torch.distributed.all_reduce(t)


def build_model(cfg: FinetuneConfig, device: torch.device):
    """Base checkpoint → (NF4) → peft LoRA on ``device``; bf16 base on CUDA, fp32 on CPU."""
    from llmray.model.checkpoint import load_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = load_model(cfg.base, device="cpu", dtype=dtype, kernels=cfg.kernels)
    gc = cfg.lora.qlora if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    pm = lora.apply_lora(base, cfg.lora, device, cfg.compute_dtype, gradient_checkpointing=gc)
    return pm.train()


class _Session:
    """What the loop needs from Ray Train; ``LocalSession`` runs the same loop in-process (tests, bench)."""

    rank, world, device = 0, 1, torch.device("cpu")

    def checkpoint_dir(self) -> Path | None:
        return None

    def report(self, metrics: dict, ckpt: Path | None) -> None:
        pass


class RaySession(_Session):
    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._ckpt = ray.train.get_checkpoint()

    def checkpoint_dir(self) -> Path | None:
        # a local copy (downloaded if the run's storage is remote); adapter + optimizer state are small
        return None if self._ckpt is None else Path(self._ckpt.to_directory())

    def report(self, metrics: dict, ckpt: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)


class LocalSession(_Session):
    """In-process single worker: checkpoints go to ``ckpt_root``, reports are kept in ``self.reports``."""

    def __init__(self, device: str | torch.device = "cpu", ckpt_root: Path | None = None) -> None:
        self.device = torch.device(device)
        self.ckpt_root = ckpt_root
        self.reports: list[tuple[dict, Path | None]] = []

    def checkpoint_dir(self) -> Path | None:
        ckpts = sorted(self.ckpt_root.glob("checkpoint_*")) if self.ckpt_root else []
        return ckpts[-1] if ckpts else None

    def report(self, metrics: dict, ckpt: Path | None) -> None:
        if ckpt is not None and self.ckpt_root is not None:
            dest = self.ckpt_root / f"checkpoint_{metrics['step']:08d}"
            shutil.copytree(ckpt, dest, dirs_exist_ok=True)
            ckpt = dest
        self.reports.append((metrics, ckpt))


def train_loop(config: dict, session: _Session) -> dict:
    """One worker's fine-tuning loop (Ray Train's train_loop_per_worker body). Returns final metrics."""
    cfg = FinetuneConfig.from_dict(config["cfg"])
    train = chat_data.from_arrays(config["train"])
    val = chat_data.from_arrays(config["val"])
    pad_id, rank, world, device = config["pad_id"], session.rank, session.world, session.device
    torch.manual_seed(cfg.seed)
    pm = build_model(cfg, device)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = build_optimizer(pm, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)  # adapters only
    total = cfg.max_steps or steps_per_epoch(len(train), cfg.batch_size, world)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20)
    trainable, all_params = lora.trainable_parameters(pm)
    resume = session.checkpoint_dir()
    state = lora.load_training_state(resume, pm, opt) if resume is not None else {"step": 0}
    logger = MetricsLogger(config.get("metrics_file"), total, resume_step=state["step"], enabled=rank == 0)
    if resume is not None:
        logger.log({"event": "resumed", "step": state["step"], "from": str(resume)}, console=False)
        print(f"resumed from {resume} at step {state['step']}", flush=True)
    else:
        state["val_loss_before"] = evaluate(pm, val, cfg, rank, world, pad_id, device)
        logger.log(
            {
                "event": "val",
                "step": 0,
                "val_loss": state["val_loss_before"],
                "val_loss_before": state["val_loss_before"],
                "trainable_params": trainable,
                "total_params": all_params,
            }
        )
    step, t0, tokens, metrics = state["step"], time.perf_counter(), 0, None
    while step < total:
        if config.get("fail_at_step") == step and not Path(config["fail_marker"]).exists():
            Path(config["fail_marker"]).write_text("failed once")  # test hook: one injected crash
            raise RuntimeError(f"injected failure at step {step}")
        ids, tgt = batch_for_step(train, step, cfg, rank, world, pad_id)
        set_lr(opt, lr_multiplier(step, total, warmup, "cosine", min_lr_ratio=0.1))
        with autocast(device):
            loss = pm(ids.to(device), targets=tgt.to(device))
        loss.backward()
        if world > 1:  # average the adapter gradients: one all-reduce over a flat buffer
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            _all_reduce(flat, world)
            for p, g in zip(params, flat.div_(world).split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p.grad))
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += ids.numel()
        logger.log(
            {
                "step": step,
                "loss": round(loss.item(), 5),
                "grad_norm": round(float(gnorm), 4),
                "lr": opt.param_groups[0]["lr"],
                "tokens_per_s": round(tokens * world / (time.perf_counter() - t0), 1),
            }
        )
        if step % cfg.checkpoint_every == 0 or step == total:
            final = step == total
            state["step"] = step
            metrics = {"step": step, "loss": loss.item(), "val_loss_before": state["val_loss_before"]}
            if final:
                metrics["val_loss_after"] = evaluate(pm, val, cfg, rank, world, pad_id, device)
                metrics.update(trainable_params=trainable, total_params=all_params)
                logger.log({"event": "val", "val_loss": metrics["val_loss_after"], **metrics})
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    ckpt = Path(tmp)
                    lora.save_training_state(ckpt, pm, opt, {**state, "metrics": metrics}, cfg.base)
                session.report(metrics, ckpt)
    return metrics if metrics is not None else state.get("metrics", {})


def train_worker(config: dict) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    train_loop(config, RaySession())


# --- the driver -----------------------------------------------------------------------------------
def run_finetune(cfg: FinetuneConfig, fail_at_step: int | None = None) -> dict[str, Any]:
    """Validate data, run the TorchTrainer, copy the final adapter into ``cfg.out``; returns its metrics.

    Bad data raises before ``cfg.out`` is created. ``fail_at_step`` injects one worker crash (tests).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

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
    resources = {"CPU": 1, "GPU": 1} if cfg.use_gpu else {"CPU": 0.5}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning finished without a checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as ckpt:
        state = json.loads((Path(ckpt) / "state.json").read_text())
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
    for name in lora.ADAPTER_FILES:
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
