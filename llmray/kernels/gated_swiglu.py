"""SwiGLU over a fused gate|up projection: y[t] = silu(x[t, :I]) * x[t, I:] for x (..., 2I) -> (..., I).

The engine's fused gate/up GEMM writes both halves into one row; this reads them in place (no copies of
the strided halves). Forward only (inference); fp32 math, stored in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels._common import as_rows

BLOCK = 1024


@triton.jit
def _gated_swiglu_kernel(X, Y, n_cols, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


def gated_swiglu_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(x.dtype)


def gated_swiglu(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2I) with its halves [gate | up] -> silu(gate) * up (..., I), a new contiguous tensor."""
    if x.shape[-1] % 2:
        raise ValueError(f"gated_swiglu needs an even last dimension, got {x.shape[-1]}")
    rows = as_rows(x)
    m, n = rows.shape[0], x.shape[-1] // 2
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        _gated_swiglu_kernel[(m, triton.cdiv(n, BLOCK))](rows, y, n, rows.stride(0), y.stride(0), BLOCK=BLOCK)
    return y.view(*x.shape[:-1], n)
