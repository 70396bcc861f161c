"""Triton kernels of ``llmray.train.optim_kernels`` (imported there on first use, so CPU runs skip triton)."""

from __future__ import annotations

import triton
import triton.language as tl

cdiv = triton.cdiv


@triton.jit
def _momentum_at(G, B, offs, mask, SCALE, mu, NESTEROV: tl.constexpr, HAS_SCALE: tl.constexpr):
    """The momentum step at G[offs], B[offs]: G * scale (clipping, a device scalar; G itself unchanged),
    B <- torch.lerp(B, G, 1 - mu) stored in B's dtype; returns the update Muon orthogonalises (fp32):
    torch.lerp(G, B, mu) with Nesterov, else B."""
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(SCALE).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    b = b + (1.0 - mu) * (g - b)  # lerp's weight < 0.5 form
    tl.store(B + offs, b.to(B.dtype.element_ty), mask=mask)
    if NESTEROV:
        return b - (b - g) * (1.0 - mu)  # lerp's weight >= 0.5 form
    return b


@triton.jit
def _momentum_kernel(
    G, BUF, U, SCALE, n, mu, NESTEROV: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = _momentum_at(G, BUF, offs, mask, SCALE, mu, NESTEROV, HAS_SCALE)
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


@triton.jit
def _momentum_multi_kernel(
    GP, BP, U, SCALE, PARTS, n, nparts, mu,
    NESTEROV: tl.constexpr, HAS_SCALE: tl.constexpr, NSQ_OUT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``_momentum_kernel`` over a shape group in one launch: matrix program_id(1), its fp32 gradient and
    momentum at the addresses GP[i], BP[i] (int64 tables), its update at U + i * n (a contiguous stack).
    NSQ_OUT: PARTS[i, program_id(0)] = the sum of squares of this block's update as stored (|U_i|_F^2 in
    ``nparts`` partial sums, for Newton-Schulz's normalization)."""
    i = tl.program_id(1)
    g_ptr = tl.load(GP + i).to(tl.pointer_type(tl.float32))
    b_ptr = tl.load(BP + i).to(tl.pointer_type(tl.float32))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    uq = _momentum_at(g_ptr, b_ptr, offs, mask, SCALE, mu, NESTEROV, HAS_SCALE).to(U.dtype.element_ty)
    tl.store(U + i.to(tl.int64) * n + offs, uq, mask=mask)
    if NSQ_OUT:
        uf = uq.to(tl.float32)
        tl.store(PARTS + i.to(tl.int64) * nparts + tl.program_id(0), tl.sum(uf * uf, axis=0))


@triton.jit
def _momentum_t_multi_kernel(
    GP, BP, U, SCALE, PARTS, R, C, nparts, mu,
    NESTEROV: tl.constexpr, HAS_SCALE: tl.constexpr, NSQ_OUT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """``_momentum_multi_kernel`` for tall weights (R, C), R > C: the update is stored transposed, as the
    (C, R) slot U + i * R * C of a stack in the wide orientation; program (0, 1) is a (BR, BC) tile of matrix
    program_id(2); NSQ_OUT: its sum of squares at PARTS[i, tile]."""
    i = tl.program_id(2)
    g_ptr = tl.load(GP + i).to(tl.pointer_type(tl.float32))
    b_ptr = tl.load(BP + i).to(tl.pointer_type(tl.float32))
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (r < R)[:, None] & (c < C)[None, :]
    offs = r.to(tl.int64)[:, None] * C + c[None, :]  # (BR, BC) in the weight's rows
    uq = _momentum_at(g_ptr, b_ptr, offs, mask, SCALE, mu, NESTEROV, HAS_SCALE).to(U.dtype.element_ty)
    base = U + i.to(tl.int64) * R * C
    tl.store(base + c.to(tl.int64)[None, :] * R + r[:, None], uq, mask=mask)  # U_i^T: (C, R) rows
    if NSQ_OUT:
        uf = uq.to(tl.float32)
        t = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(PARTS + i.to(tl.int64) * nparts + t, tl.sum(tl.sum(uf * uf, axis=1), axis=0))


@triton.jit
def _apply_multi_kernel(
    PP, SP, O, R, C, so_n, so_r, so_c, decay, step, HAS_SH: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr
):
    """``_apply_kernel`` over a shape group in one launch: matrix program_id(2), its fp32 weight (R, C) at
    PP[i], its bf16 shadow rows at SP[i] (HAS_SH), its update O[i] (any strides)."""
    i = tl.program_id(2)
    p_ptr = tl.load(PP + i).to(tl.pointer_type(tl.float32))
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (r < R)[:, None] & (c < C)[None, :]
    r64 = r.to(tl.int64)[:, None]
    c64 = c.to(tl.int64)[None, :]
    p = tl.load(p_ptr + r64 * C + c64, mask=mask, other=0.0)
    o = tl.load(O + i.to(tl.int64) * so_n + r64 * so_r + c64 * so_c, mask=mask, other=0.0).to(tl.float32)
    p = p * decay - step * o
    tl.store(p_ptr + r64 * C + c64, p, mask=mask)
    if HAS_SH:
        s_ptr = tl.load(SP + i).to(tl.pointer_type(tl.bfloat16))
        tl.store(s_ptr + r64 * C + c64, p.to(tl.bfloat16), mask=mask)


@triton.jit
def _adamw_multi_kernel(
    PP, GP, MP, VP, NP, SCALE, beta1, beta2, eps, decay, step_size, bc2_sqrt,
    HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """AdamW over a group's fp32 tensors in one launch (``torch._fused_adamw_``'s formula): tensor
    program_id(1) at the addresses PP/GP/MP/VP[i] with NP[i] elements; program_id(0) a block of it."""
    i = tl.program_id(1)
    n = tl.load(NP + i)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    if start < n:
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        p_ptr = tl.load(PP + i).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(GP + i).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(MP + i).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(VP + i).to(tl.pointer_type(tl.float32))
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        if HAS_SCALE:
            g = g * tl.load(SCALE)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0) * decay
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(p_ptr + offs, p, mask=mask)
