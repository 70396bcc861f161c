"""Triton kernels of ``llmray.kernels.qk_norm_rope_train``'s backward (launchers and autograd live there).

Per token and head (halves x1 | x2 of the saved input, g1 | g2 of the incoming gradient, cos c, sin s):
    n  = rope^-1(g) = (g1 c + g2 s, g2 c - g1 s)       (the gradient at the normed, rounded value)
    dx = (w n - x_hat mean(x_hat w n)) / rms,   dw += n x_hat   (summed over tokens and heads)

``_tile_kernel`` (the default): a program takes BT tokens x all heads as one (BT, H, D/2) tile per half, issues
every load of its tile (q, k, their gradients, cos/sin, and v's gradient when it copies it) before any math,
and is one of NTOK / (BT ITERS) programs: the hardware keeps many tiles in flight, no program walks a long
token range. Weight gradients: each program adds its (2 D,) sum into one of NSLOT fp32 slot rows
(``tl.atomic_add``; a handful of programs share a slot), which ``rmsnorm``'s dW kernel sums: q's and k's in
one launch. ``_head_rows_kernel``: one head of BT tokens a program (the (B, H, T, D) gradient layout read in
long contiguous runs). ``_token_kernel`` (the previous design, kept for A/B): programs walk token ranges one token at a
time and write an fp32 partial row each.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmray.kernels.rope import _token_cos_sin


@triton.jit
def _tile_load(X, G, boff_x, boff_g, h, sx_h, sg_h, m, HALF: tl.constexpr):
    """One (BT, BH, HALF) x 2 tile of inputs and gradients (fp32) at token offsets boff_* (BT, 1, 1)."""
    d = tl.arange(0, HALF)[None, None, :]
    xp = X + boff_x + h * sx_h + d
    gp = G + boff_g + h * sg_h + d
    x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
    g1 = tl.load(gp, mask=m, other=0.0).to(tl.float32)
    g2 = tl.load(gp + HALF, mask=m, other=0.0).to(tl.float32)
    return x1, x2, g1, g2


@triton.jit
def _tile_math(DX, boff_o, h, so_h, m, x1, x2, g1, g2, c, s, w_ptr, eps, HALF: tl.constexpr):
    """dx of a loaded tile into DX; returns the (HALF,) halves of sum over the tile of n x_hat."""
    d = tl.arange(0, HALF)
    n1 = g1 * c + g2 * s  # rope backward: rotate by -angle
    n2 = g2 * c - g1 * s
    rstd = tl.rsqrt((tl.sum(x1 * x1, 2) + tl.sum(x2 * x2, 2)) / (2 * HALF) + eps)[:, :, None]
    w1 = tl.load(w_ptr + d).to(tl.float32)[None, None, :]
    w2 = tl.load(w_ptr + HALF + d).to(tl.float32)[None, None, :]
    xh1, xh2 = x1 * rstd, x2 * rstd
    mean = (tl.sum(xh1 * w1 * n1, 2) + tl.sum(xh2 * w2 * n2, 2))[:, :, None] / (2 * HALF)
    op = DX + boff_o + h * so_h + d[None, None, :]
    tl.store(op, ((w1 * n1 - xh1 * mean) * rstd).to(DX.dtype.element_ty), mask=m)
    tl.store(op + HALF, ((w2 * n2 - xh2 * mean) * rstd).to(DX.dtype.element_ty), mask=m)
    return tl.sum(tl.sum(n1 * xh1, 1), 0), tl.sum(tl.sum(n2 * xh2, 1), 0)


@triton.jit
def _tile_kernel(
    Q, K, DQO, DKO, QW, KW, DQ, DK, ACC, POS, COS, SIN, DVI, DVO,
    T, NTOK, HQ, HK, s_pb, s_pt, s_cos, eps,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sgq_b, sgq_t, sgq_h, sgk_b, sgk_t, sgk_h,
    sdq_b, sdq_t, sdq_h, sdk_b, sdk_t, sdk_h, sv_b, sv_t, sv_h, sdv_b, sdv_t, sdv_h,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BT: tl.constexpr,
    ITERS: tl.constexpr, NSLOT: tl.constexpr, COMPUTE_DW: tl.constexpr, COPY_V: tl.constexpr,
):  # fmt: skip
    """Q, K (saved inputs), DQO, DKO (incoming gradients), DQ, DK (outputs): (B, T, H, D) with any (b, t, h)
    strides and unit stride along D. ACC: (NSLOT, 2 D) fp32 zeros, [dqw | dkw] partial sums. COPY_V: v's
    gradient DVI (B, T, HK, D) is copied into DVO (its slice of the fused q|k|v gradient)."""
    pid = tl.program_id(0)
    d = tl.arange(0, HALF)
    hq = tl.arange(0, BLOCK_HQ)[None, :, None]
    hk = tl.arange(0, BLOCK_HK)[None, :, None]
    aq1 = tl.zeros((HALF,), dtype=tl.float32)
    aq2 = tl.zeros((HALF,), dtype=tl.float32)
    ak1 = tl.zeros((HALF,), dtype=tl.float32)
    ak2 = tl.zeros((HALF,), dtype=tl.float32)
    for it in range(ITERS):
        tok = (pid * ITERS + it) * BT + tl.arange(0, BT)  # (BT,)
        live = tok < NTOK
        b = (tok // T).to(tl.int64)
        t = (tok % T).to(tl.int64)
        b3 = b[:, None, None]
        t3 = t[:, None, None]
        mq = live[:, None, None] & (hq < HQ)
        mk = live[:, None, None] & (hk < HK)
        # every load of the tile first
        pos = tl.load(POS + b * s_pb + t * s_pt, mask=live, other=0).to(tl.int64)[:, None]
        c = tl.load(COS + pos * s_cos + d[None, :])[:, None, :]  # (BT, 1, HALF)
        s = tl.load(SIN + pos * s_cos + d[None, :])[:, None, :]
        qx1, qx2, qg1, qg2 = _tile_load(
            Q, DQO, b3 * sq_b + t3 * sq_t, b3 * sgq_b + t3 * sgq_t, hq, sq_h, sgq_h, mq, HALF
        )
        kx1, kx2, kg1, kg2 = _tile_load(
            K, DKO, b3 * sk_b + t3 * sk_t, b3 * sgk_b + t3 * sgk_t, hk, sk_h, sgk_h, mk, HALF
        )
        if COPY_V:
            d2 = tl.arange(0, 2 * HALF)[None, None, :]
            v = tl.load(DVI + b3 * sv_b + t3 * sv_t + hk * sv_h + d2, mask=mk, other=0.0)
        q1, q2 = _tile_math(
            DQ, b3 * sdq_b + t3 * sdq_t, hq, sdq_h, mq, qx1, qx2, qg1, qg2, c, s, QW, eps, HALF
        )
        k1, k2 = _tile_math(
            DK, b3 * sdk_b + t3 * sdk_t, hk, sdk_h, mk, kx1, kx2, kg1, kg2, c, s, KW, eps, HALF
        )
        if COPY_V:
            tl.store(DVO + b3 * sdv_b + t3 * sdv_t + hk * sdv_h + d2, v, mask=mk)
        aq1 += q1
        aq2 += q2
        ak1 += k1
        ak2 += k2
    if COMPUTE_DW:
        row = ACC + (pid % NSLOT) * (4 * HALF)
        tl.atomic_add(row + d, aq1)
        tl.atomic_add(row + HALF + d, aq2)
        tl.atomic_add(row + 2 * HALF + d, ak1)
        tl.atomic_add(row + 3 * HALF + d, ak2)


@triton.jit
def _head_rows_kernel(
    Q, K, DQO, DKO, QW, KW, DQ, DK, ACC, POS, COS, SIN, DVI, DVO,
    T, NTOK, HQ, HK, s_pb, s_pt, s_cos, eps,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sgq_b, sgq_t, sgq_h, sgk_b, sgk_t, sgk_h,
    sdq_b, sdq_t, sdq_h, sdk_b, sdk_t, sdk_h, sv_b, sv_t, sv_h, sdv_b, sdv_t, sdv_h,
    HALF: tl.constexpr, BT: tl.constexpr, NSLOT: tl.constexpr, COMPUTE_DW: tl.constexpr, COPY_V: tl.constexpr,
):  # fmt: skip
    """One head of BT tokens a program (rows are independent: RMSNorm is per head), program p = head p % NH of
    token block p // NH (NH = HQ + HK, + HK more copying v's gradient with COPY_V): neighbouring programs read
    one token block's q|k|v rows, each head's incoming gradient is BT contiguous rows in a (B, H, T, D) layout."""
    pid = tl.program_id(0)
    nh = HQ + HK + (HK if COPY_V else 0)
    h = pid % nh
    tok = (pid // nh) * BT + tl.arange(0, BT)
    live = tok < NTOK
    b = (tok // T).to(tl.int64)[:, None]
    t = (tok % T).to(tl.int64)[:, None]
    m = live[:, None]
    d = tl.arange(0, HALF)[None, :]
    if h >= HQ + HK:  # v's gradient into its slice of the fused gradient
        hv = h - HQ - HK
        d2 = tl.arange(0, 2 * HALF)[None, :]
        v = tl.load(DVI + b * sv_b + t * sv_t + hv * sv_h + d2, mask=m, other=0.0)
        tl.store(DVO + b * sdv_b + t * sdv_t + hv * sdv_h + d2, v, mask=m)
    else:
        if h < HQ:
            xp = Q + b * sq_b + t * sq_t + h * sq_h + d
            gp = DQO + b * sgq_b + t * sgq_t + h * sgq_h + d
            op = DQ + b * sdq_b + t * sdq_t + h * sdq_h + d
            w_ptr = QW
        else:
            hk = h - HQ
            xp = K + b * sk_b + t * sk_t + hk * sk_h + d
            gp = DKO + b * sgk_b + t * sgk_t + hk * sgk_h + d
            op = DK + b * sdk_b + t * sdk_t + hk * sdk_h + d
            w_ptr = KW
        col = (h >= HQ).to(tl.int32) * (2 * HALF)  # [dqw | dkw] in a slot row
        pos = tl.load(POS + b * s_pb + t * s_pt, mask=m, other=0).to(tl.int64)
        x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
        g1 = tl.load(gp, mask=m, other=0.0).to(tl.float32)
        g2 = tl.load(gp + HALF, mask=m, other=0.0).to(tl.float32)
        c = tl.load(COS + pos * s_cos + d)
        s = tl.load(SIN + pos * s_cos + d)
        n1 = g1 * c + g2 * s
        n2 = g2 * c - g1 * s
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + d).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
        xh1, xh2 = x1 * rstd, x2 * rstd
        mean = (tl.sum(xh1 * w1 * n1, 1) + tl.sum(xh2 * w2 * n2, 1))[:, None] / (2 * HALF)
        tl.store(op, ((w1 * n1 - xh1 * mean) * rstd).to(DQ.dtype.element_ty), mask=m)
        tl.store(op + HALF, ((w2 * n2 - xh2 * mean) * rstd).to(DQ.dtype.element_ty), mask=m)
        if COMPUTE_DW:
            row = ACC + (pid % NSLOT) * (4 * HALF) + col + tl.arange(0, HALF)
            tl.atomic_add(row, tl.sum(n1 * xh1, 0))
            tl.atomic_add(row + HALF, tl.sum(n2 * xh2, 0))


@triton.jit
def _head_bwd(
    src, dsrc, dst, w_ptr, c, s, s_h, sd_h, so_h, n_heads, eps, HALF: tl.constexpr, BLOCK_H: tl.constexpr
):
    """One token's heads: dx into dst; returns the (BLOCK_H, HALF) x 2 halves of g * x_hat for dW."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    m = (h < n_heads)[:, None]
    x1 = tl.load(src + h[:, None] * s_h + d[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + h[:, None] * s_h + HALF + d[None, :], mask=m, other=0.0).to(tl.float32)
    g1 = tl.load(dsrc + h[:, None] * sd_h + d[None, :], mask=m, other=0.0).to(tl.float32)
    g2 = tl.load(dsrc + h[:, None] * sd_h + HALF + d[None, :], mask=m, other=0.0).to(tl.float32)
    n1 = g1 * c + g2 * s
    n2 = g2 * c - g1 * s
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(w_ptr + d).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + d).to(tl.float32)[None, :]
    xh1, xh2 = x1 * rstd, x2 * rstd
    mean = (tl.sum(xh1 * w1 * n1, 1) + tl.sum(xh2 * w2 * n2, 1))[:, None] / (2 * HALF)
    out = dst + h[:, None] * so_h + d[None, :]
    tl.store(out, ((w1 * n1 - xh1 * mean) * rstd).to(dst.dtype.element_ty), mask=m)
    tl.store(out + HALF, ((w2 * n2 - xh2 * mean) * rstd).to(dst.dtype.element_ty), mask=m)
    return tl.sum(n1 * xh1, 0), tl.sum(n2 * xh2, 0)


@triton.jit
def _token_kernel(
    Q, K, DQO, DKO, QW, KW, DQ, DK, PART, POS, COS, SIN,
    T, NTOK, tok_per_prog, HQ, HK, s_pb, s_pt, s_cos, eps,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sgq_b, sgq_t, sgq_h, sgk_b, sgk_t, sgk_h,
    sdq_b, sdq_t, sdq_h, sdk_b, sdk_t, sdk_h,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, COMPUTE_DW: tl.constexpr,
):  # fmt: skip
    """The previous design: a program walks tok_per_prog tokens one at a time; PART: (programs, 2 D) fp32."""
    pid = tl.program_id(0)
    d = tl.arange(0, HALF)
    aq1 = tl.zeros((HALF,), dtype=tl.float32)
    aq2 = tl.zeros((HALF,), dtype=tl.float32)
    ak1 = tl.zeros((HALF,), dtype=tl.float32)
    ak2 = tl.zeros((HALF,), dtype=tl.float32)
    start = pid * tok_per_prog
    for i in range(0, tok_per_prog):
        tok = start + i
        if tok < NTOK:
            b, t, c, s = _token_cos_sin(POS, COS, SIN, tok, T, s_pb, s_pt, s_cos, d, HALF, 1.0, False)
            q1, q2 = _head_bwd(
                Q + b * sq_b + t * sq_t, DQO + b * sgq_b + t * sgq_t, DQ + b * sdq_b + t * sdq_t, QW, c, s,
                sq_h, sgq_h, sdq_h, HQ, eps, HALF, BLOCK_HQ,
            )  # fmt: skip
            k1, k2 = _head_bwd(
                K + b * sk_b + t * sk_t, DKO + b * sgk_b + t * sgk_t, DK + b * sdk_b + t * sdk_t, KW, c, s,
                sk_h, sgk_h, sdk_h, HK, eps, HALF, BLOCK_HK,
            )  # fmt: skip
            aq1 += q1
            aq2 += q2
            ak1 += k1
            ak2 += k2
    if COMPUTE_DW:
        row = PART + pid * 4 * HALF
        tl.store(row + d, aq1)
        tl.store(row + HALF + d, aq2)
        tl.store(row + 2 * HALF + d, ak1)
        tl.store(row + 3 * HALF + d, ak2)


@triton.jit
def _copy_rows_kernel(SRC, DST, M, s_src, s_dst, N: tl.constexpr, BM: tl.constexpr):
    """DST[r, :N] = SRC[r, :N] for M rows with their own row strides (v's gradient into the fused gradient)."""
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    c = tl.arange(0, N)
    m = (r < M)[:, None]
    r64 = r.to(tl.int64)[:, None]
    tl.store(DST + r64 * s_dst + c[None, :], tl.load(SRC + r64 * s_src + c[None, :], mask=m), mask=m)
