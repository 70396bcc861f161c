"""SwiGLU activation silu(gate) * up: Triton forward/backward kernels, launcher, autograd.

Element-wise over the flattened tensors, in fp32, stored in the input dtype. The backward recomputes
sigmoid(gate) rather than saving activations: d_gate = dy * up * s * (1 + g (1 - s)), d_up = dy * silu(g).
Non-contiguous inputs are copied to contiguous ones first (the model's projections are contiguous).

``swiglu_fused`` is the same op over one fused gate|up projection x (..., 2I) = [gate | up] (training's
fused gate/up GEMM): the forward reads both halves in place, the backward writes d_gate and d_up straight
into one (..., 2I) gradient, so the GEMM's input gradient is one GEMM (no sum of two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels._common import as_rows, check_device
from llmray.kernels.gated_swiglu import _gated_swiglu_kernel
from llmray.kernels.reference import swiglu_ref

__all__ = ["swiglu", "swiglu_ref", "swiglu_fwd", "swiglu_bwd", "swiglu_fused"]

BLOCK = 2048  # elements per program: 4 warps x 32 threads x 16 elements (two 16-byte vectors of bf16)


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu needs gate and up of one shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
            f"and {tuple(up.shape)} {up.dtype}"
        )
    check_device(gate, up)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, block: int = BLOCK, num_warps: int = 4) -> torch.Tensor:
    """silu(gate) * up for contiguous gate, up of one shape -> new tensor."""
    y = torch.empty_like(gate, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, y, n, BLOCK=block, num_warps=num_warps)
    return y


def swiglu_bwd(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, block: int = BLOCK, num_warps: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (d_gate, d_up) for contiguous dy, gate, up."""
    dg = torch.empty_like(gate, memory_format=torch.contiguous_format)
    du = torch.empty_like(up, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        grid = (triton.cdiv(n, block),)
        _swiglu_bwd_kernel[grid](dy, gate, up, dg, du, n, BLOCK=block, num_warps=num_warps)
    return dg, du


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dy.contiguous(), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up (..., I); differentiable in both."""
    _check(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLUFn.apply(gate, up)
    return swiglu_fwd(gate.contiguous(), up.contiguous())


@triton.jit
def _fused_bwd_kernel(DY, X, DX, n_cols, stride_dy, stride_x, stride_dx, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DX + row * stride_dx + cols, dg.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * stride_dx + n_cols + cols, (dy * g * sig).to(DX.dtype.element_ty), mask=mask)


FUSED_BLOCK = 1024


def _fused_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu_fused needs an even last dimension [gate | up], got {x.shape[-1]}")
    return as_rows(x), x.shape[-1] // 2


def swiglu_fused_fwd(x: torch.Tensor) -> torch.Tensor:
    """x (M, 2I) rows [gate | up] (unit column stride) -> silu(gate) * up (M, I)."""
    m, n = x.shape[0], x.shape[1] // 2
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        grid = (m, triton.cdiv(n, FUSED_BLOCK))
        _gated_swiglu_kernel[grid](x, y, n, x.stride(0), y.stride(0), BLOCK=FUSED_BLOCK, num_warps=4)
    return y


def swiglu_fused_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy (M, I), x (M, 2I) -> dx (M, 2I) = [d_gate | d_up]."""
    m, n = x.shape[0], x.shape[1] // 2
    dx = torch.empty(m, 2 * n, dtype=x.dtype, device=x.device)
    if m:
        grid = (m, triton.cdiv(n, FUSED_BLOCK))
        _fused_bwd_kernel[grid](
            dy, x, dx, n, dy.stride(0), x.stride(0), dx.stride(0), BLOCK=FUSED_BLOCK, num_warps=4
        )
    return dx


class _SwiGLUFusedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rows, n = _fused_rows(x)
        ctx.save_for_backward(rows)
        ctx.x_shape = x.shape
        return swiglu_fused_fwd(rows).view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return swiglu_fused_bwd(as_rows(dy), rows).view(ctx.x_shape)


def swiglu_fused(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x (..., 2I) -> (..., I); differentiable in x."""
    check_device(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SwiGLUFusedFn.apply(x)
    rows, n = _fused_rows(x)
    return swiglu_fused_fwd(rows).view(*x.shape[:-1], n)
