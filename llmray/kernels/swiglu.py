"""SwiGLU activation silu(gate) * up: Triton forward/backward kernels, launcher, autograd.

Element-wise over the flattened tensors, in fp32, stored in the input dtype. The backward recomputes
sigmoid(gate) rather than saving activations: d_gate = dy * up * s * (1 + g (1 - s)), d_up = dy * silu(g).
Non-contiguous inputs are copied to contiguous ones first (the model's projections are contiguous).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels._common import check_device
from llmray.kernels.reference import swiglu_ref

__all__ = ["swiglu", "swiglu_ref", "swiglu_fwd", "swiglu_bwd"]

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
