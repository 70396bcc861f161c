"""The optimizer step's elementwise passes, fused (Triton on CUDA; the same math in torch ops elsewhere).

Muon's step per weight W (fp32 master) with gradient G and momentum B, in plain torch ops
(``llmray.train.muon``'s fallback) reads and writes every element about ten times: lerp into B, a Nesterov
lerp into a new fp32 tensor, a stack, a bf16 cast, and after Newton-Schulz an fp32 cast and the add.
Here that is two passes:
- ``muon_momentum_``: B <- lerp(B, G, 1 - mu); U = lerp(G, B, mu) (Nesterov) or B, written in bf16 straight
  into its slot of the stacked (n, rows, cols) Newton-Schulz input (14 bytes per element instead of ~42);
- ``muon_apply_``: W <- W (1 - lr wd) - step_lr O, reading O in bf16 (10 bytes per element instead of ~18).
``adamw_``: AdamW over a group in one pass per tensor (``torch._fused_adamw_``, the kernel behind
``torch.optim.AdamW(fused=True)``) instead of seven foreach passes; same formula as
``MuonWithAuxAdam._adamw_group``'s foreach fallback (bias-corrected, decoupled weight decay).
The Triton kernels live in ``llmray.train._optim_triton``, imported on first use: a CPU worker (tests, Ray
Train on CPU) never imports triton.
"""

from __future__ import annotations

import math

import torch

from llmray.model.master_linear import SHADOW

BLOCK = 4096
# one launch per shape group (the matrices' addresses in an int64 table) instead of one per matrix: ~390
# launches a step fewer on qwen3-0.6b (fp32 weights, gradients and momentum; others keep the loop)
MULTI = True
_TABLES: dict[tuple, torch.Tensor] = {}


def _int64_table(key: tuple, values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device``, cached by ``key`` (built once for the CUDA-graphed step's
    buffers, which keep their addresses). Made on the current stream (the optimizer's side stream), which is
    the one that reads it."""
    tab = _TABLES.get(key)
    if tab is None:
        if len(_TABLES) >= 256:  # eager steps get new gradient buffers: keep the cache bounded
            _TABLES.clear()
        tab = _TABLES[key] = torch.tensor(values, dtype=torch.int64).to(device)
    return tab


def _table(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' addresses as an int64 tensor on their device (cached by those addresses)."""
    ptrs = tuple(t.data_ptr() for t in tensors)
    return _int64_table((tensors[0].device, ptrs), ptrs, tensors[0].device)


def _all_fp32(*groups: list[torch.Tensor]) -> bool:
    return all(t.dtype == torch.float32 for g in groups for t in g)


def use_triton(*tensors: torch.Tensor) -> bool:
    """The default: the Triton kernels on contiguous CUDA tensors (``fused=True`` forces them, e.g. on CPU
    under the interpreter in tests)."""
    return all(t.device.type == "cuda" and t.is_contiguous() for t in tensors)


# the transposing momentum kernel's (TILE, TILE) tiles: TILE * TILE = BLOCK elements, as a 1-D block
TILE = 64


def norm_parts(rows: int, cols: int) -> int:
    """How many partial sums of squares ``muon_momentum_`` writes per matrix of a (rows, cols) shape (either
    orientation): one per block of its kernel."""
    return max(math.ceil(rows * cols / BLOCK), math.ceil(rows / TILE) * math.ceil(cols / TILE))


def muon_momentum_(
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    out: torch.Tensor,  # (n, rows, cols), or (n, cols, rows) with transpose; usually bf16: the NS input
    mu: float,
    nesterov: bool,
    fused: bool | None = None,
    scale: torch.Tensor | None = None,  # () fp32 device scalar: the gradients count as grads * scale
    transpose: bool = False,
    parts: torch.Tensor | None = None,  # (n, norm_parts(rows, cols)) fp32 zeros: |out[i]|_F^2 in partial sums
) -> None:
    """Update each momentum buffer in place and write the (Nesterov) update into ``out[i]`` (transposed
    with ``transpose``: a tall weight's update in a stack of the wide orientation).

    ``fused=None``: the Triton kernel where ``use_triton`` holds, torch ops otherwise. ``scale``: gradient
    clipping's coefficient, applied as the gradients are read (the torch path scales them in place first).
    ``parts``: the sum of squares of each written update (as stored), in partial sums that add up to
    |out[i]|_F^2 (the kernels write one per block, the torch path the whole sum in column 0)."""
    if len(grads) != len(bufs) or out.shape[0] != len(grads):
        raise ValueError(f"{len(grads)} gradients, {len(bufs)} buffers and {out.shape[0]} output slots")
    if fused is None:
        fused = use_triton(out, *grads, *bufs)
    n = out[0].numel()
    multi = MULTI and out.is_contiguous() and _all_fp32(grads, bufs) and all(g.numel() == n for g in grads)
    if fused and not multi and (transpose or parts is not None):
        fused = False  # the per-matrix kernels write neither: the torch passes
    if not fused:
        if scale is not None:
            torch._foreach_mul_(grads, scale)
        torch._foreach_lerp_(bufs, grads, 1 - mu)
        upd = torch._foreach_lerp(grads, bufs, mu) if nesterov else bufs
        for i, u in enumerate(upd):
            out[i].copy_(u.mT if transpose else u)
        if parts is not None:
            parts.zero_()
            parts[:, 0] = torch.linalg.vector_norm(out, dim=(-2, -1), dtype=torch.float32).square()
        return
    from llmray.train._optim_triton import (
        _momentum_kernel,
        _momentum_multi_kernel,
        _momentum_t_multi_kernel,
        cdiv,
    )

    sc = scale if scale is not None else out
    pa = parts if parts is not None else out
    np_ = parts.shape[1] if parts is not None else 0
    if multi and transpose:
        rows, cols = grads[0].shape
        if parts is not None and np_ < cdiv(rows, TILE) * cdiv(cols, TILE):
            raise ValueError(f"parts: {np_} columns, the kernel writes {cdiv(rows, TILE) * cdiv(cols, TILE)}")
        _momentum_t_multi_kernel[(cdiv(rows, TILE), cdiv(cols, TILE), len(grads))](
            _table(grads), _table(bufs), out, sc, pa, rows, cols, np_, mu,
            NESTEROV=nesterov, HAS_SCALE=scale is not None, NSQ_OUT=parts is not None, BR=TILE, BC=TILE,
            num_warps=8,
        )  # fmt: skip
        return
    if multi:
        if parts is not None and np_ < cdiv(n, BLOCK):
            raise ValueError(f"parts: {np_} columns, the kernel writes {cdiv(n, BLOCK)}")
        _momentum_multi_kernel[(cdiv(n, BLOCK), len(grads))](
            _table(grads), _table(bufs), out, sc, pa, n, np_, mu,
            NESTEROV=nesterov, HAS_SCALE=scale is not None, NSQ_OUT=parts is not None, BLOCK=BLOCK, num_warps=8,
        )  # fmt: skip
        return
    for i, (g, b) in enumerate(zip(grads, bufs, strict=True)):
        n = g.numel()
        _momentum_kernel[(cdiv(n, BLOCK),)](
            g, b, out[i], scale if scale is not None else g, n, mu,
            NESTEROV=nesterov, HAS_SCALE=scale is not None, BLOCK=BLOCK, num_warps=8,
        )  # fmt: skip


def muon_apply_(
    params: list[torch.Tensor],
    ortho: torch.Tensor,  # (n, rows, cols): the orthogonalised updates, any float dtype and strides
    decay: float,  # 1 - lr * weight_decay
    step: float,  # the shape-adjusted learning rate
    fused: bool | None = None,
) -> None:
    """params[i] <- params[i] * decay - step * ortho[i], in place."""
    if ortho.shape[0] != len(params):
        raise ValueError(f"{len(params)} parameters but {ortho.shape[0]} updates")
    if fused is None:
        fused = use_triton(*params) and ortho.device.type == "cuda"
    if not fused:
        if decay != 1.0:
            torch._foreach_mul_(params, decay)
        torch._foreach_add_(params, list(ortho.to(params[0].dtype).unbind(0)), alpha=-step)
        return
    from llmray.train._optim_triton import _apply_kernel, _apply_multi_kernel, cdiv

    rows, cols = ortho.shape[1:]
    grid = (cdiv(rows, 64), cdiv(cols, 64))
    shadows = [getattr(p, SHADOW, None) for p in params]
    has_sh = all(sh is not None and sh[0].dtype == torch.bfloat16 for sh in shadows)
    if MULTI and _all_fp32(params) and (has_sh or not any(shadows)) and grid[0] * grid[1] > 0:
        pt = _table(params)
        st = _table([sh[0] for sh in shadows]) if has_sh else pt  # type: ignore[index]
        _apply_multi_kernel[(grid[0], grid[1], len(params))](
            pt, st, ortho, rows, cols, *ortho.stride(), decay, step, HAS_SH=has_sh, BR=64, BC=64, num_warps=4
        )  # fmt: skip
        for p, sh in zip(params, shadows, strict=True):
            if sh is not None:  # a Triton write moves no version counter: still current
                setattr(p, SHADOW, (sh[0], p._version))
        return
    for i, p in enumerate(params):
        o = ortho[i]
        sh = getattr(p, SHADOW, None)  # a low-precision copy the forward reads: written in the same pass
        _apply_kernel[grid](
            p, o, sh[0] if sh is not None else p, rows, cols, o.stride(0), o.stride(1), decay, step,
            HAS_SH=sh is not None, BR=64, BC=64, num_warps=4,
        )  # fmt: skip
        if sh is not None:
            setattr(p, SHADOW, (sh[0], p._version))  # a Triton write moves no version counter: still current


def adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,  # the step count after this update (1 on the first)
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: torch.Tensor | None = None,  # () fp32 device scalar: the gradients count as grads * scale
    triton: bool | None = None,
) -> bool:
    """One fused AdamW update of a group (all tensors of one device and dtype); False if it cannot run
    fused here (the caller then takes the foreach path). ``scale`` reaches the kernel as its grad_scale
    (which divides: 1 / scale), so clipping costs no pass of its own. ``triton`` (None: ``ADAMW_TRITON`` on
    contiguous fp32 CUDA tensors): our one-launch kernel for the group instead of ``torch._fused_adamw_``."""
    tensors = params + grads + exp_avgs + exp_avg_sqs
    if not params:
        return False
    if triton is None:
        triton = ADAMW_TRITON and use_triton(*tensors)
    if triton and all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        _adamw_triton(params, grads, exp_avgs, exp_avg_sqs, step, lr, betas, eps, weight_decay, scale)
        return True
    if not hasattr(torch, "_fused_adamw_"):
        return False
    dev, dt = params[0].device, params[0].dtype
    if any(t.device != dev or t.dtype != dt for t in tensors) or dt not in (torch.float32, torch.bfloat16):
        return False
    steps = list(torch.full((len(params),), float(step), device=dev, dtype=torch.float32).unbind(0))
    torch._fused_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, [], steps,
        lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
        grad_scale=None if scale is None else (1.0 / scale).to(device=dev, dtype=torch.float32),
    )  # fmt: skip
    return True


ADAMW_TRITON = True  # AdamW groups of fp32 CUDA tensors by ``_adamw_multi_kernel`` (one launch a group)


def _adamw_triton(params, grads, exp_avgs, exp_avg_sqs, step, lr, betas, eps, weight_decay, scale) -> None:
    """``adamw_``'s update by our kernel: the same formula as ``torch._fused_adamw_`` (fp32 math)."""
    from llmray.train._optim_triton import _adamw_multi_kernel, cdiv

    b1, b2 = betas
    sizes = [p.numel() for p in params]
    nt = _int64_table((params[0].device, "numel", tuple(sizes)), tuple(sizes), params[0].device)
    _adamw_multi_kernel[(cdiv(max(sizes), BLOCK), len(params))](
        _table(params), _table(grads), _table(exp_avgs), _table(exp_avg_sqs), nt,
        scale if scale is not None else nt, b1, b2, eps, 1 - lr * weight_decay, lr / (1 - b1**step),
        math.sqrt(1 - b2**step), HAS_SCALE=scale is not None, BLOCK=BLOCK, num_warps=8,
    )  # fmt: skip
