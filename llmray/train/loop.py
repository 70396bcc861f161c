"""Training-loop pieces shared by pretraining and fine-tuning (no Ray imports here).

- ``build_optimizer``: Muon + AdamW (one object) or plain AdamW over a model's trainable parameters;
- ``lr_multiplier`` / ``set_lr``: warmup then cosine, WSD (warmup-stable-decay) or constant;
- ``save_checkpoint`` / ``load_checkpoint``: the one checkpoint format of pretraining and fine-tuning:
  model (or adapter) and optimizer tensors in safetensors, everything else (step, schedule, data position,
  optimizer hyper-parameters and scalar state) in JSON; never pickle. A checkpoint directory is written
  under a temporary name and renamed into place (``replace_dir``), so it is complete or absent.

Metrics, MFU and plots live in ``llmray.train.metrics`` (re-exported here); precision, autocast, the step
and evaluation in ``llmray.train.harness``; the Ray Train session in ``llmray.train.session``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmray.train.metrics import (  # noqa: F401  (re-exported: the loop's public names)
    H100_H200_BF16_PEAK_FLOPS,
    MetricsLogger,
    flops_per_token,
    mfu,
    plot_loss_curve,
    read_metrics,
)
from llmray.train.muon import MuonWithAuxAdam

# --- optimizer and schedule ----------------------------------------------------------------------------
NS_SYM = True  # Muon's Newton-Schulz on our symmetric Triton products with kernels="triton" (W1 H200: 19.1 -> 13.7 ms)


SHADOWS = True  # bf16 copies of the projection weights written by Muon's update pass (W1 H200: ~0.5 ms with the rest)


def attach_weight_shadows(model: torch.nn.Module) -> bool:
    """bf16 shadows of the projection weights (``llmray.model.master_linear.attach_shadows``) on one CUDA
    process (plain fp32 tensors; not under FSDP2 / DDP, whose updates take the unfused path anyway)."""
    from llmray.model.master_linear import attach_shadows

    get_groups = getattr(model, "projection_groups", None)
    groups: list[list[torch.Tensor]] = get_groups() if callable(get_groups) else []
    flat = [w for g in groups for w in g]
    if not flat or any(
        not w.is_cuda or w.dtype != torch.float32 or type(w).__name__ == "DTensor" for w in flat
    ):
        return False
    attach_shadows(groups, torch.bfloat16)
    return True


def muon_param_groups(
    model: torch.nn.Module,
    muon_lr: float,
    adam_lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    adjust_lr_fn: str = "original",
) -> list[dict[str, Any]]:
    """Split a Qwen3 model: 2-D weights inside the decoder layers -> Muon; embeddings, head, norms -> AdamW.

    The embedding and the head are 2-D too but are not "hidden" weights (their rows are looked up or
    compared against one by one), so they stay with AdamW as Muon's authors prescribe. A tied head is
    one parameter and appears once.
    """
    seen: set[int] = set()
    hidden, matrices, vectors = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() == 2 and ".layers." in f".{name}":
            hidden.append(p)
        elif p.dim() >= 2:
            matrices.append(p)  # embed_tokens, lm_head
        else:
            vectors.append(p)  # RMSNorm weights
    groups: list[dict[str, Any]] = []
    if hidden:
        groups.append(
            dict(
                params=hidden, use_muon=True, lr=muon_lr, weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn
            )
        )
    if matrices:
        groups.append(
            dict(params=matrices, use_muon=False, lr=adam_lr, betas=betas, weight_decay=weight_decay)
        )
    if vectors:
        groups.append(dict(params=vectors, use_muon=False, lr=adam_lr, betas=betas, weight_decay=0.0))
    return groups


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
        muon = MuonWithAuxAdam(groups)
        ops = getattr(model, "ops", None)  # our kernels: Newton-Schulz's symmetric products too
        muon.ns_sym = NS_SYM and getattr(ops, "name", None) == "triton"
        if SHADOWS and getattr(ops, "name", None) == "triton" and getattr(ops, "linear", None) is not None:
            attach_weight_shadows(model)
        opt: torch.optim.Optimizer = muon
    elif optimizer == "adamw":
        seen: set[int] = set()
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
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
LEGACY_FINETUNE_STATE = "state.json"  # fine-tuning checkpoints before the one format: adapter/ + state.json


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
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a training checkpoint directory atomically (temporary sibling, then ``replace_dir``).

    ``model_state`` / ``optimizer_state``: the tensors to write instead of the model's and optimizer's own
    state: gathered full tensors (FSDP2, ``llmray.train.fsdp``) or only the trainable ones (LoRA).
    ``extra(tmp_dir)`` adds files (fine-tuning: the PEFT adapter) before the rename.
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
    if extra is not None:
        extra(tmp)
    replace_dir(tmp, path)
    return path


def replace_dir(new: Path, path: Path) -> None:
    """Put the complete directory ``new`` at ``path``; never rmtree + copy. An existing ``path`` is renamed
    aside first and deleted only once ``new`` is in place, so a crash at any point leaves either the old
    checkpoint (at ``path`` or, between the two renames, at ``<path>.old-<pid>``, which
    ``resolve_checkpoint`` picks up) or the new one."""
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` if it holds a checkpoint; else the previous one a crash left aside by ``replace_dir``.

    Raises with a conversion hint for fine-tuning checkpoints of the earlier format (state.json)."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    if (path / LEGACY_FINETUNE_STATE).exists():
        return path  # the fine-tuning loader reads it (llmray.train.finetune)
    aside = sorted(path.parent.glob(f"{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    aside = [p for p in aside if (p / STATE_FILE).exists()]
    if not path.exists() and aside:
        return aside[-1]
    raise FileNotFoundError(
        f"{path} is not a training checkpoint (no {STATE_FILE}); llmray checkpoints hold {MODEL_FILE}, "
        f"{OPTIM_FILE} and {STATE_FILE}"
    )


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
    path = resolve_checkpoint(path)
    if not (path / STATE_FILE).exists():
        raise ValueError(
            f"{path} is a fine-tuning checkpoint of the earlier format (adapter/ + state.json); resume it "
            "with `llmray finetune` (which still reads that format), or start a new run from its adapter/"
        )
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


def autocast_context(device: torch.device) -> Any:
    """The harness's autocast at the default precision (bf16 on CUDA, none on CPU); kept for old callers."""
    from llmray.train.harness import autocast, resolve_precision

    return autocast(device, resolve_precision("auto", device))


def export_model(checkpoint_dir: str | Path, mc: Any, tokenizer: Any, out: str | Path) -> Path:
    """Write a training checkpoint's weights as a Hugging Face Qwen3 directory (with the tokenizer)."""
    from llmray.model.checkpoint import save_model
    from llmray.model.qwen3 import Qwen3ForCausalLM

    model = Qwen3ForCausalLM(mc, kernels="torch")
    load_checkpoint(checkpoint_dir, model, None)
    return save_model(model, out, tokenizer=tokenizer, dtype=torch.float32)
