"""What a training step needs, shared by pretraining and fine-tuning: precision, autocast, one step, evaluation.

- ``resolve_precision``: the one dtype resolver. ``auto`` = bf16 on CUDA, fp32 elsewhere; ``bf16`` also
  works on CPU (autocast on the CPU: how the CPU tests run the GPU's mixed-precision path).
- ``autocast``: the one autocast: bf16 autocast over fp32 master weights (pretraining) or over a bf16
  frozen base with fp32 adapters (fine-tuning); a no-op for fp32.
- ``train_step``: forward + backward over the micro-batches of one optimizer step, gradient clipping and
  the optimizer step; returns the mean loss (a device tensor: no host sync) and the gradient norm.
- ``evaluate``: token-weighted mean loss and next-token accuracy over (ids, targets) batches, sharded over
  ranks and all-reduced (targets of -100 are not counted).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from llmray.train.graphs import StepGraphs

PRECISIONS = ("auto", "bf16", "fp32")
IGNORE = -100


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """``auto`` | ``bf16`` | ``fp32`` -> the compute dtype on ``device`` (auto: bf16 on CUDA, fp32 elsewhere)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {'|'.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for a bf16 compute dtype; nothing for fp32."""
    device = torch.device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_step(
    forward: Callable[..., torch.Tensor],
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    n_micro: int,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    grad_clip: float,
    before_backward: Callable[[int], contextlib.AbstractContextManager] | None = None,
    after_backward: Callable[[], None] | None = None,
    graphs: StepGraphs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``n_micro`` micro-batches of (ids, targets): mean loss and gradient norm.

    ``before_backward(i)`` wraps micro-batch i's forward + backward (DDP's ``no_sync`` / FSDP's gradient
    sync switch); ``after_backward()`` runs before clipping (the LoRA gradient all-reduce). With
    ``graphs`` (``llmray.train.graphs.StepGraphs`` over the same forward) each micro-batch's forward +
    backward replays a CUDA graph (gradients zeroed in place instead of freed if ``graphs.accumulate``).
    """
    loss_sum = torch.zeros((), device=device)
    for i, (ids, targets) in enumerate(micro_batches):
        ctx = before_backward(i) if before_backward is not None else contextlib.nullcontext()
        with ctx:
            if graphs is not None:
                loss = graphs.fwd_bwd(ids, targets, n_micro)
            else:
                with autocast(device, dtype):
                    loss = forward(ids, targets=targets) / n_micro
                loss.backward()
        loss_sum += loss.detach()
    if after_backward is not None:
        after_backward()
    if FOLD_CLIP and getattr(optimizer, "accepts_grad_scale", False) and not _any_dtensor(optimizer, params):
        # clipping folded into the optimizer's passes: the norm here, the scaling as the gradients are read
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        scale = (grad_clip / (grad_norm + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_
        optimizer.step(grad_scale=scale)  # type: ignore[call-overload]
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=graphs is None or not graphs.accumulate)
    return loss_sum, grad_norm


FOLD_CLIP = True  # optimizers with ``accepts_grad_scale`` (Muon) apply the clipping inside their passes


def _any_dtensor(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> bool:
    """Whether any parameter is a DTensor (FSDP2: clip_grad_norm_ keeps the sharded norm); cached."""
    cached = getattr(optimizer, "_llmray_any_dtensor", None)
    if cached is None:
        cached = any(type(p).__name__ == "DTensor" for p in params)
        optimizer._llmray_any_dtensor = cached  # type: ignore[attr-defined]
    return cached


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    world: int = 1,
    lockstep: int | None = None,
) -> dict[str, Any]:
    """Mean loss and accuracy over this rank's (ids (B, T), targets (B, T)) batches, all-reduced over ranks.

    ``lockstep``: every rank runs this many forwards (FSDP2 gathers weights inside each forward, so a rank
    with a batch fewer would hang the others); the surplus forwards are not counted.
    """
    import torch.distributed as dist

    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, counted targets
    was_training = model.training
    model.eval()
    with autocast(device, dtype):
        for _ in range(len(batches), lockstep or 0):
            model(
                batches[0][0][:1].to(device)
                if batches
                else torch.zeros(1, 1, dtype=torch.long, device=device)
            )
        for ids, targets in batches:
            ids, targets = ids.to(device), targets.to(device)
            rows = max(1, (1 << 28) // max(1, ids.shape[1] * _vocab(model)))  # bound the fp32 logits
            for r in range(0, ids.shape[0], rows):
                logits = model(ids[r : r + rows]).float()  # (b, T, V)
                tgt = targets[r : r + rows]
                sums[0] += F.cross_entropy(
                    logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE, reduction="sum"
                ).double()
                sums[1] += ((logits.argmax(-1) == tgt) & (tgt != IGNORE)).sum().double()
                sums[2] += (tgt != IGNORE).sum().double()
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    count = max(sums[2].item(), 1.0)
    return {"val_loss": sums[0].item() / count, "val_accuracy": sums[1].item() / count}


def _vocab(model: torch.nn.Module) -> int:
    for m in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "vocab_size"):
            return int(cfg.vocab_size)
    return 1 << 17
