"""Muon's update for groups the fused single-process passes do not take: DDP (every rank holds the same
all-reduced gradients; each rank orthogonalises its 1/world share of each shape group and the new weights are
all-gathered), FSDP2 (DTensor rows: each update matrix is brought whole to one rank, ``orthogonalize_rows``), and
plain tensors without the fused passes. Torch foreach ops on the local shards; ``llmray.train.muon`` holds the
optimizer and the Newton-Schulz iteration, passed in here as ``ns`` (and the step size as ``lr_for``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from llmray.train.fsdp import is_dtensor, orthogonalize_rows


def muon_group_unfused(
    state: dict, group: dict[str, Any], ns: Callable[..., torch.Tensor], lr_for: Callable[..., float]
) -> None:
    """One Muon step of ``group`` (momentum, Nesterov, Newton-Schulz ``ns``, decoupled weight decay, the
    shape-aware step ``lr_for(lr, shape, adjust_lr_fn)``); ``state``: the optimizer's per-parameter state."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
    bufs = momentum_buffers(state, params)
    torch._foreach_lerp_(local_tensors(bufs), local_tensors([grad_of(p) for p in params]), 1 - mu)
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for p in params:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    if any(is_dtensor(p) for p in params):  # FSDP2: each rank holds rows of every matrix
        _muon_sharded(state, group, by_shape, ns, lr_for)
        return
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    for shape, plist in by_shape.items():
        per_rank = math.ceil(len(plist) / world)
        mine = plist[rank * per_rank : (rank + 1) * per_rank]  # this rank's share, may be empty
        if mine:
            bufs = [state[p]["momentum_buffer"] for p in mine]
            if group["nesterov"]:
                upd = list(torch._foreach_lerp([grad_of(p) for p in mine], bufs, mu))
            else:
                upd = bufs
            ortho = ns(torch.stack(upd), steps=group["ns_steps"])  # (n, r, c)
            step_lr = lr_for(lr, shape, group["adjust_lr_fn"])
            if wd:
                torch._foreach_mul_(mine, 1 - lr * wd)
            torch._foreach_add_(mine, list(ortho.to(mine[0].dtype).unbind(0)), alpha=-step_lr)
        if world > 1:
            # every rank contributes per_rank matrices (zero padding past the end); all receive all
            send = torch.zeros((per_rank, *shape), dtype=plist[0].dtype, device=plist[0].device)
            for i, p in enumerate(mine):
                send[i].copy_(p)
            recv = [torch.empty_like(send) for _ in range(world)]
            dist.all_gather(recv, send)
            gathered = torch.cat(recv)  # (world * per_rank, rows, cols)
            for i, p in enumerate(plist):
                p.copy_(gathered[i])


def _muon_sharded(
    state: dict,
    group: dict[str, Any],
    by_shape: dict[tuple[int, ...], list[torch.Tensor]],
    ns: Callable[..., torch.Tensor],
    lr_for: Callable[..., float],
) -> None:
    """FSDP2 (DTensor rows): each update matrix is orthogonalised whole by one rank, rows sent back.

    ``orthogonalize_rows`` moves the matrices (all-to-all) so each rank runs Newton-Schulz on 1/world
    of them; the result equals the unsharded update.
    """
    mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
    ns_steps = group["ns_steps"]
    for shape, plist in by_shape.items():
        bufs = [state[p]["momentum_buffer"] for p in plist]
        upd = bufs
        if group["nesterov"]:  # elementwise on the local shards, then wrapped as DTensors again
            local = torch._foreach_lerp(local_tensors([grad_of(p) for p in plist]), local_tensors(bufs), mu)
            upd = [_like(t, b) for t, b in zip(local, bufs, strict=True)]
        ortho = orthogonalize_rows(upd, lambda x: ns(x, steps=ns_steps))
        if wd:
            torch._foreach_mul_(local_tensors(plist), 1 - lr * wd)
        step_lr = lr_for(lr, shape, group["adjust_lr_fn"])
        torch._foreach_add_(local_tensors(plist), local_tensors(ortho), alpha=-step_lr)


def momentum_buffers(state: dict, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's momentum buffer in the optimizer's ``state`` (zeros like it on its first step)."""
    for p in params:
        if "momentum_buffer" not in state[p]:
            state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return [state[p]["momentum_buffer"] for p in params]


def grad_of(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``; the groups' steps take only parameters that have one."""
    assert p.grad is not None, "the optimizer steps only parameters with a gradient"
    return p.grad


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The local shards of DTensors (FSDP2), other tensors as they are: the optimizer's elementwise
    foreach ops run on shards (torch 2.11's DTensor has no sharding rule for some of them, e.g. lerp)."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]


def _like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local`` wrapped as a DTensor placed like ``like`` (or ``local`` itself for a plain tensor)."""
    if not is_dtensor(like):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )
