"""RMSNorm and fused residual-add + RMSNorm: Triton forward/backward kernels, launchers, autograd.

y = x / sqrt(mean(x^2) + eps) * w over the last dim, computed in fp32 and stored in x.dtype (as the torch
reference ``llmray.model.ops.rms_norm_torch``). The add variant returns (rms_norm(x + r), x + r) with the
sum rounded to x.dtype before the norm, exactly as ``x + residual`` in torch.

Layout: any (..., N) input is viewed as (M, N) rows; a program normalises a tile of BLOCK_M whole rows
(several narrow q/k-head rows per program, one wide row per program). The backward recomputes x_hat from
the saved per-row 1/rms; the weight gradient sum over rows is split across a fixed number of programs,
each writing an fp32 partial sum (P, N) that torch sums once (no atomics, deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels._common import as_rows, check_device, num_programs_for_reduction, row_block_config
from llmray.model.ops import add_rms_norm_torch as add_rms_norm_ref
from llmray.model.ops import rms_norm_torch as rms_norm_ref

__all__ = ["rms_norm", "add_rms_norm", "rms_norm_ref", "add_rms_norm_ref", "rms_norm_fwd", "rms_norm_bwd"]


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, S, RSTD,  # X, R, Y, S: (M, N) rows; W: (N,); RSTD: (M,) fp32
    stride_x, stride_r, stride_y, stride_s,
    M, N, eps,
    HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like torch's x + residual
        tl.store(S + r64 * stride_s + cols[None, :], s, mask=mask)
        xf = s.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / N + eps)  # (BLOCK_M,)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xf * rstd[:, None] * w[None, :]
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DS, DX, DW_PART,  # DW_PART: (P, N) fp32 partial weight gradients
    stride_dy, stride_x, stride_ds, stride_dx,
    M, N, rows_per_prog,
    HAS_DS: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row0 = pid * rows_per_prog
    for i in range(0, rows_per_prog, BLOCK_M):  # rows_per_prog is a multiple of BLOCK_M
        rows = row0 + i + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        wdy = w[None, :] * dy
        c = tl.sum(xhat * wdy, axis=1) / N  # (BLOCK_M,)
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]
        if HAS_DS:  # gradient flowing into the residual-sum output of add_rms_norm
            dx += tl.load(DS + r64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * xhat
    if COMPUTE_DW:
        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=cmask)


def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward on rows x (M, N) [+ residual (M, N)] -> (y (M, N), sum (M, N) or None, rstd (M,)).

    ``config`` = (BLOCK_M, num_warps) overrides the heuristic (bench sweeps only)."""
    m, n = x.shape
    if weight.shape != (n,):
        raise ValueError(
            f"RMSNorm weight has shape {tuple(weight.shape)}, expected ({n},) for inputs (..., {n})"
        )
    check_device(x, weight)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    s = torch.empty_like(y) if residual is not None else None
    if m == 0:
        return y, s, rstd
    block_m, block_n, warps = row_block_config(n, m)
    if config is not None:
        block_m, warps = config
    r = residual if residual is not None else x
    _rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x, r, weight, y, s if s is not None else y, rstd,
        x.stride(0), r.stride(0), y.stride(0), y.stride(0),
        m, n, eps,
        HAS_RES=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return y, s, rstd


def rms_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    ds: torch.Tensor | None = None,
    compute_dw: bool = True,
    config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward on rows: dy, x (M, N), rstd (M,), optional ds (M, N) added to dx -> (dx, dw or None)."""
    m, n = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if m == 0:
        return dx, torch.zeros_like(weight) if compute_dw else None
    block_m, block_n, warps = row_block_config(n, m)
    if config is not None:
        block_m, warps = config
    progs = num_programs_for_reduction(triton.cdiv(m, block_m), x.device)
    rows_per_prog = triton.cdiv(triton.cdiv(m, progs), block_m) * block_m
    progs = triton.cdiv(m, rows_per_prog)
    dw_part = torch.empty((progs, n), device=x.device, dtype=torch.float32) if compute_dw else dx
    d_s = ds if ds is not None else dy
    _rms_norm_bwd_kernel[(progs,)](
        dy, x, weight, rstd, d_s, dx, dw_part,
        dy.stride(0), x.stride(0), d_s.stride(0), dx.stride(0),
        m, n, rows_per_prog,
        HAS_DS=ds is not None, COMPUTE_DW=compute_dw, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return dx, dw_part.sum(0).to(weight.dtype) if compute_dw else None


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = as_rows(x)  # (M, N)
        y, _, rstd = rms_norm_fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(as_rows(dy), x2, weight, rstd, compute_dw=ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        x2, r2 = as_rows(x), as_rows(residual)
        y, s, rstd = rms_norm_fwd(x2, weight, eps, residual=r2)
        ctx.save_for_backward(s, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape), s.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, ds: torch.Tensor | None):
        s2, weight, rstd = ctx.saved_tensors
        if dy is None:  # only the residual sum was used downstream
            dy = torch.zeros_like(s2)
        ds2 = as_rows(ds) if ds is not None else None
        dx, dw = rms_norm_bwd(as_rows(dy), s2, weight, rstd, ds=ds2, compute_dw=ctx.needs_input_grad[2])
        dx = dx.view(ctx.x_shape)
        return dx, dx, dw, None


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (..., N) with weight (N,); differentiable in x and weight."""
    if _needs_autograd(x, weight):
        return _RMSNormFn.apply(x, weight, eps)
    y, _, _ = rms_norm_fwd(as_rows(x), weight, eps)
    return y.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; x and residual (..., N) of one dtype."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(
            f"add_rms_norm needs x and residual of one shape and dtype, got {tuple(x.shape)} {x.dtype} "
            f"and {tuple(residual.shape)} {residual.dtype}"
        )
    if _needs_autograd(x, residual, weight):
        return _AddRMSNormFn.apply(x, residual, weight, eps)
    y, s, _ = rms_norm_fwd(as_rows(x), weight, eps, residual=as_rows(residual))
    return y.view(x.shape), s.view(x.shape)
