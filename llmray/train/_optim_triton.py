"""Triton kernels of ``llmray.train.optim_kernels`` (imported there on first use, so CPU runs skip triton)."""

from __future__ import annotations

import triton
import triton.language as tl

cdiv = triton.cdiv


@triton.jit
def _momentum_kernel(
    G, BUF, U, SCALE, n, mu, NESTEROV: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:  # gradient clipping folded in: G * scale (a device scalar), G itself unchanged
        g = g * tl.load(SCALE).to(tl.float32)
    b = tl.load(BUF + offs, mask=mask, other=0.0).to(tl.float32)
    b = b + (1.0 - mu) * (g - b)  # torch.lerp(b, g, 1 - mu), weight < 0.5
    tl.store(BUF + offs, b.to(BUF.dtype.element_ty), mask=mask)
    if NESTEROV:
        u = b - (b - g) * (1.0 - mu)  # torch.lerp(g, b, mu), weight >= 0.5
    else:
        u = b
    tl.store(U + offs, u.to(U.dtype.element_ty), mask=mask)


@triton.jit
def _apply_kernel(
    P, O, SH, R, C, so_r, so_c, decay, step, HAS_SH: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr
):
    # P: (R, C) contiguous; O: (R, C) with any strides (a tall weight's update arrives transposed)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (r < R)[:, None] & (c < C)[None, :]
    r64 = r.to(tl.int64)[:, None]
    c64 = c.to(tl.int64)[None, :]
    p = tl.load(P + r64 * C + c64, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(O + r64 * so_r + c64 * so_c, mask=mask, other=0.0).to(tl.float32)
    p = p * decay - step * o
    tl.store(P + r64 * C + c64, p.to(P.dtype.element_ty), mask=mask)
    if HAS_SH:  # the weight's low-precision shadow (model/master_linear.py), contiguous rows
        tl.store(SH + r64 * C + c64, p.to(SH.dtype.element_ty), mask=mask)
