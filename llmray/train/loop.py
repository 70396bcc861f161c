"""Training-loop pieces shared by pretraining and fine-tuning (no Ray imports here).

- ``build_optimizer``: Muon + AdamW (one object) or plain AdamW over a model's trainable parameters;
- ``lr_multiplier`` / ``set_lr``: warmup then cosine, WSD (warmup-stable-decay) or constant;
- ``save_checkpoint`` / ``load_checkpoint``: model and optimizer tensors in safetensors, everything else
  (step, schedule, data position, optimizer hyper-parameters and scalar state) in JSON; never pickle.
  A checkpoint directory is written under a temporary name and renamed, so it is complete or absent;
- ``MetricsLogger``: rank 0's per-step metrics to the console (step, loss, tokens/s, MFU, ETA) and to a
  JSONL file (Ray Train V2 keeps only metrics reported together with a checkpoint);
- ``flops_per_token`` / ``mfu``; ``plot_loss_curve`` (PNG from the JSONL file).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llmray.train.muon import MuonWithAuxAdam, muon_param_groups

H100_H200_BF16_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak (SXM), as used for MFU


# --- optimizer and schedule ----------------------------------------------------------------------------
def build_optimizer(
    model: torch.nn.Module,
    optimizer: str = "muon",
    lr: float = 1e-3,
    muon_lr: float = 0.02,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.Optimizer:
    """``muon``: Muon on the decoder's 2-D weights, AdamW (lr) on the rest; ``adamw``: AdamW everywhere.

    Norm weights never decay. Each group remembers its peak lr as ``base_lr`` for the schedule.
    """
    if optimizer == "muon":
        groups = muon_param_groups(model, muon_lr=muon_lr, adam_lr=lr, weight_decay=weight_decay, betas=betas)
        opt: torch.optim.Optimizer = MuonWithAuxAdam(groups)
    elif optimizer == "adamw":
        seen: set[int] = set()
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
        fused = all(p.is_cuda for p in decay + no_decay)
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=fused or None)
    else:
        raise ValueError(f"optimizer must be 'muon' or 'adamw', got {optimizer!r}")
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]
    return opt


def lr_multiplier(
    step: int,
    max_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Factor on the peak lr for ``step`` (0-based): linear warmup, then cosine / WSD / constant.

    WSD holds the peak until the last ``decay_fraction`` of the steps, then decays linearly to
    ``min_lr_ratio``; cosine decays from the end of warmup to ``min_lr_ratio`` at ``max_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_start = max(warmup_steps, int(max_steps * (1 - decay_fraction)))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1 - min_lr_ratio) * progress
    raise ValueError(f"schedule must be cosine, wsd or constant, got {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier


# --- checkpoints ----------------------------------------------------------------------------------------
MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "trainer_state.json"


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with shared tensors (a tied head) stored once, on the CPU, contiguous."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _split_optimizer_state(
    optimizer: torch.optim.Optimizer, sd: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict() if sd is None else sd
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a training checkpoint directory atomically (temporary sibling, then rename).

    ``model_state`` / ``optimizer_state``: already gathered full tensors (FSDP2, ``llmray.train.fsdp``)
    to write instead of the model's and optimizer's own (sharded) state.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model_state if model_state is not None else model_tensors(model), str(tmp / MODEL_FILE))
    meta: dict[str, Any] = {"trainer": state}
    if optimizer is not None:
        tensors, meta["optimizer"] = _split_optimizer_state(optimizer, optimizer_state)
        save_file(tensors, str(tmp / OPTIM_FILE))
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    weights: bool = True,
) -> dict[str, Any]:
    """Restore model (and optimizer) in place from ``save_checkpoint``'s directory; returns the trainer state.

    ``weights=False`` restores only the optimizer (FSDP2 loads the weights before sharding, the optimizer
    after; its saved full tensors are cut to this rank's rows).
    """
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE_FILE})")
    meta = json.loads((path / STATE_FILE).read_text())
    if weights:
        _load_weights(path, model)
    if optimizer is not None:
        if "optimizer" not in meta:
            raise ValueError(f"checkpoint {path} holds no optimizer state")
        tensors = load_file(str(path / OPTIM_FILE))
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        for idx, scalars in meta["optimizer"]["scalar_state"].items():
            state.setdefault(int(idx), {}).update(scalars)
        groups = meta["optimizer"]["param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        from llmray.train.fsdp import shard_optimizer_state

        shard_optimizer_state(state, optimizer)  # no-op unless the parameters are FSDP2 DTensors
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    return meta["trainer"]


def _load_weights(path: Path, model: torch.nn.Module) -> None:
    weights = load_file(str(path / MODEL_FILE))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    shared = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    missing = [m for m in missing if m not in shared]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


# --- evaluation --------------------------------------------------------------------------------------------
def evaluate_windows(
    model: torch.nn.Module,
    windows: np.ndarray,
    batch_size: int,
    device: torch.device,
    lockstep: bool = False,
) -> dict[str, float]:
    """Mean next-token loss and accuracy over (n, T + 1) windows; sharded over ranks, all-reduced.

    ``lockstep``: every rank runs the same number of forwards (FSDP2 all-gathers weights inside each
    forward, so a rank with one batch fewer would hang the others); surplus forwards are not counted.
    """
    import torch.distributed as dist
    import torch.nn.functional as F

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    mine = windows[rank::world]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast_context(device):
        n_batches = math.ceil(math.ceil(len(windows) / world) / batch_size) if lockstep else None
        starts = list(range(0, len(mine), batch_size))
        for _ in range(len(starts), n_batches or 0):
            model(torch.from_numpy(windows[:1, :-1]).to(device))  # keeps the collectives in step
        for i in starts:
            batch = torch.from_numpy(mine[i : i + batch_size]).to(device)
            logits = model(batch[:, :-1])  # (B, T, V) fp32
            targets = batch[:, 1:]
            sums[0] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").double()
            sums[1] += (logits.argmax(-1) == targets).sum().double()
            sums[2] += targets.numel()
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    return {"val_loss": (sums[0] / sums[2]).item(), "val_accuracy": (sums[1] / sums[2]).item()}


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights and optimizer state); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- throughput -----------------------------------------------------------------------------------------
def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 6 L S H D (N = matmul parameters, tied head counted once)."""
    n = config.num_params() - config.num_hidden_layers * (2 * config.hidden_size + 2 * config.head_dim)
    n -= config.hidden_size  # final norm
    attn = 6 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 6 * n + attn


def mfu(
    tokens_per_s: float, config: Any, seq_len: int, peak_flops: float = H100_H200_BF16_PEAK_FLOPS
) -> float:
    return tokens_per_s * flops_per_token(config, seq_len) / peak_flops


# --- logging --------------------------------------------------------------------------------------------
class MetricsLogger:
    """Per-step metrics of rank 0: one JSON line each in ``path`` and a progress line on the console.

    ``resume_step`` drops lines past the step a resumed run restarts from, so the file holds one curve.
    """

    def __init__(self, path: str | Path | None, max_steps: int, resume_step: int = 0, enabled: bool = True):
        self.path = Path(path) if path else None
        self.max_steps = max_steps
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.first_step = resume_step
        if enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = (
                [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
            )
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if console:
            print(self.progress_line(record), flush=True, file=sys.stdout)

    def progress_line(self, r: dict[str, Any]) -> str:
        step = r.get("step", 0)
        done = max(1, step - self.first_step)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * max(0, self.max_steps - step)
        parts = [f"step {step}/{self.max_steps}"]
        for key, fmt in (
            ("loss", "{:.4f}"),
            ("val_loss", "{:.4f}"),
            ("lr", "{:.2e}"),
            ("tokens_per_s", "{:,.0f}"),
        ):
            if key in r:
                parts.append(f"{key.replace('tokens_per_s', 'tok/s')} " + fmt.format(r[key]))
        if "mfu" in r:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        parts.append(f"eta {eta:.0f}s")
        return " | ".join(parts)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(
    curves: dict[str, list[dict[str, Any]]], out_png: str | Path, title: str = "loss", x: str = "step"
) -> Path:
    """One PNG with train loss (thin) and val loss (markers) of each named metrics list."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, records) in enumerate(curves.items()):
        color = f"C{i}"
        train = [(r[x], r["loss"]) for r in records if "loss" in r]
        val = [(r[x], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, alpha=0.35, lw=0.8, label=f"{name} train")
        if val:
            ax.plot(*zip(*val, strict=True), color=color, marker="o", ms=3, lw=1.5, label=f"{name} val")
    ax.set_xlabel(x)
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
