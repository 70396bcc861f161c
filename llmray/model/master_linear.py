"""A projection over fp32 master weights under bf16 autocast whose weight gradient comes out in fp32.

Autocast runs ``F.linear(x, w)`` on a bf16 copy of the fp32 weight: the weight-gradient GEMM writes bf16 and
autograd then casts it to fp32 (one more kernel per weight, reading and writing every gradient element).
Here the weight-gradient GEMM writes fp32 itself (``torch.mm(..., out_dtype=torch.float32)``, fp32
accumulation as before, on CUDA; elsewhere mm + cast), so the cast kernels go. Same values: the GEMM
accumulates in fp32 either way and the bf16 rounding of the gradient is skipped (slightly more exact).
Several weights (``[w_gate, w_up]``) run as one GEMM over their concatenation (cast, then cat), and each gets
its rows of the one fp32 gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_OUT_DTYPE_MM = True  # torch.mm(out_dtype=) available here (set False after the first failure)


def _wgrad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy (M, N), x (M, K) in bf16 -> dy^T x (N, K) in fp32."""
    global _OUT_DTYPE_MM
    if dy.device.type == "cuda" and _OUT_DTYPE_MM:
        try:
            return torch.mm(dy.t(), x, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_MM = False
    return torch.mm(dy.t(), x).float()


SHADOW = "_llmray_shadow"  # attribute of a weight: (its low-precision copy, the weight's _version it matches)


def attach_shadows(groups: list[list[torch.Tensor]], dtype: torch.dtype) -> None:
    """Give each group of fp32 weights (e.g. [w_q, w_k, w_v]) one ``dtype`` buffer over their concatenation,
    each weight a row range of it (``weight.<SHADOW>``); the optimizer writes it as it updates the weight
    (``llmray.train.optim_kernels.muon_apply_``), so the forward reads it instead of casting (and
    concatenating) the fp32 weights: no cast/cat kernels on the critical path. A weight changed in place by
    anything else (its ``_version`` moves) falls back to the cast."""
    for ws in groups:
        buf = torch.cat([w.detach().to(dtype) for w in ws])
        row = 0
        for w in ws:
            setattr(w, SHADOW, (buf[row : row + w.shape[0]], w._version))
            row += w.shape[0]


def detach_shadows(weights: list[torch.Tensor]) -> None:
    for w in weights:
        if hasattr(w, SHADOW):
            delattr(w, SHADOW)


def _shadow(weights: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """The current ``dtype`` copy of cat(weights) if the weights are one shadow buffer's rows, in order."""
    views = []
    for w in weights:
        sh = getattr(w, SHADOW, None)
        if sh is None or sh[0].dtype != dtype or sh[1] != w._version:
            return None
        views.append(sh[0])
    if len(views) == 1:
        return views[0]
    first = views[0]
    base, off, width = first.untyped_storage().data_ptr(), first.storage_offset(), first.shape[1]
    for v in views:
        if v.untyped_storage().data_ptr() != base or v.storage_offset() != off or v.shape[1] != width:
            return None
        off += v.numel()
    return first.as_strided((sum(v.shape[0] for v in views), width), (width, 1))


class _MasterLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype, *weights: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            w = _shadow(weights, dtype)
            if w is None:
                w = weights[0].to(dtype) if len(weights) == 1 else torch.cat([v.to(dtype) for v in weights])
            xc = x.to(dtype)
            y = F.linear(xc, w)  # (..., N)
        ctx.save_for_backward(xc, w)
        ctx.rows = [v.shape[0] for v in weights]
        ctx.dtypes = (x.dtype, [v.dtype for v in weights])
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xc, w = ctx.saved_tensors
        x_dtype, w_dtypes = ctx.dtypes
        dy2 = dy.reshape(-1, dy.shape[-1]).to(w.dtype)  # (M, N)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ w).view(*dy.shape[:-1], w.shape[1]).to(x_dtype)
        grads: list[torch.Tensor | None] = [None] * len(ctx.rows)
        if any(ctx.needs_input_grad[2:]):
            dw = _wgrad(dy2, xc.reshape(-1, xc.shape[-1]))  # (N, K) fp32
            grads = [g.to(dt) for g, dt in zip(dw.split(ctx.rows), w_dtypes, strict=True)]
        return dx, None, *grads


def master_linear(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, cat(weights))`` in the autocast dtype (bf16 autocast over fp32 weights), fp32 weight
    gradients straight from the GEMM. Outside autocast, plain ``F.linear`` over the (concatenated) weights."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return F.linear(x, weights[0] if len(weights) == 1 else torch.cat(weights))
    return _MasterLinearFn.apply(x, torch.get_autocast_dtype(dev), *weights)
