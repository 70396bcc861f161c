"""Triton kernels of ``llmray.kernels.qk_norm_rope_train``'s backward (launchers and autograd live there).

Per token and head (halves x1 | x2 of the saved input, g1 | g2 of the incoming gradient, cos c, sin s):
    n  = rope^-1(g) = (g1 c + g2 s, g2 c - g1 s)       (the gradient at the normed, rounded value)
    dx = (w n - x_hat mean(x_hat w n)) / rms,   dw += n x_hat   (summed over tokens and heads)

Weight gradients: each program adds its (D,) sums into one of NSLOT fp32 slot rows (``tl.atomic_add``), which
``rmsnorm``'s dW kernel sums: q's and k's in one launch. The designs (launcher, numbers:
``qk_norm_rope_train``):
- ``_tma_kernel`` (the default): persistent programs over (batch, token block, head) items, x and g tiles by
  tensor descriptors, pipelined NS - 1 items ahead through shared memory (``_tma_heads``), then v's copy.
- ``_head_group_kernel``: HG heads of BT tokens a program, the next head's tiles loaded before this one's math.
- ``_head_rows_kernel`` (the previous default): one head of BT tokens a program.
- ``_token_kernel`` (the design before): programs walk token ranges one token at a time, an fp32 partial row
  each.
The tma and group kernels do a row's math as ``_group_head``: the row kernel's expressions in its order, so
the same bits (H200: dqkv bit-identical on both gradient layouts).
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmray.kernels.rope import _token_cos_sin


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
def _group_head(O, w1, w2, c, s, m, acc1, acc2, x1, x2, g1, g2, eps, HALF: tl.constexpr):
    """dx of one (BT, HALF) x 2 head tile (raw loads x*, g*) into O; returns acc* += n x_hat (dW, elementwise).
    The row kernel's expressions, in its order: the same rounding."""
    d = tl.arange(0, HALF)[None, :]
    x1, x2, g1, g2 = x1.to(tl.float32), x2.to(tl.float32), g1.to(tl.float32), g2.to(tl.float32)
    n1 = g1 * c + g2 * s
    n2 = g2 * c - g1 * s
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    xh1, xh2 = x1 * rstd, x2 * rstd
    mean = (tl.sum(xh1 * w1 * n1, 1) + tl.sum(xh2 * w2 * n2, 1))[:, None] / (2 * HALF)
    tl.store(O + d, ((w1 * n1 - xh1 * mean) * rstd).to(O.dtype.element_ty), mask=m)
    tl.store(O + HALF + d, ((w2 * n2 - xh2 * mean) * rstd).to(O.dtype.element_ty), mask=m)
    return acc1 + n1 * xh1, acc2 + n2 * xh2


@triton.jit
def _head_group_kernel(
    Q, K, DQO, DKO, QW, KW, DQ, DK, ACC, POS, COS, SIN, DVI, DVO,
    T, NTOK, HQ, HK, s_pb, s_pt, s_cos, eps,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sgq_b, sgq_t, sgq_h, sgk_b, sgk_t, sgk_h,
    sdq_b, sdq_t, sdq_h, sdk_b, sdk_t, sdk_h, sv_b, sv_t, sv_h, sdv_b, sdv_t, sdv_h,
    HALF: tl.constexpr, BT: tl.constexpr, HG: tl.constexpr, NSLOT: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COPY_V: tl.constexpr, VW: tl.constexpr, PREFETCH: tl.constexpr, EV_X: tl.constexpr, EV_C: tl.constexpr,
):  # fmt: skip
    """HG heads of BT tokens a program (the row kernel's work for HG heads): cos/sin and the weights loaded once
    for HG heads, the weight gradients summed over them in registers (one slot add a program), the next head's
    tiles loaded before this one's math (PREFETCH). Program p = head group p % NG of token block p // NG
    (NG = cdiv(HQ, HG) q groups + cdiv(HK, HG) k groups [+ cdiv(HK, HG) groups copying v's gradient])."""
    pid = tl.program_id(0)
    nqg = tl.cdiv(HQ, HG)
    nkg = tl.cdiv(HK, HG)
    ng = nqg + nkg + (nkg if COPY_V else 0)
    gi = pid % ng
    tok = (pid // ng) * BT + tl.arange(0, BT)
    live = tok < NTOK
    b = (tok // T).to(tl.int64)[:, None]
    t = (tok % T).to(tl.int64)[:, None]
    m = live[:, None]
    d = tl.arange(0, HALF)[None, :]
    if gi >= nqg + nkg:  # v's gradient into its slice of the fused gradient: HG heads as one (BT, VW) tile
        j = tl.arange(0, VW)
        hv = (gi - nqg - nkg) * HG + j // (2 * HALF)
        mv = (tok < NTOK)[:, None] & ((j < HG * 2 * HALF) & (hv < HK))[None, :]
        hd = hv[None, :] * sv_h + j[None, :] % (2 * HALF)
        v = tl.load(DVI + b * sv_b + t * sv_t + hd, mask=mv, other=0.0, eviction_policy=EV_X)
        tl.store(DVO + b * sdv_b + t * sdv_t + hv[None, :] * sdv_h + j[None, :] % (2 * HALF), v, mask=mv)
    else:
        isq = gi < nqg
        h0 = tl.where(isq, gi, gi - nqg) * HG  # first head of the group
        nh = tl.where(isq, HQ, HK)
        sx_h, sg_h, so_h = tl.where(isq, sq_h, sk_h), tl.where(isq, sgq_h, sgk_h), tl.where(isq, sdq_h, sdk_h)
        if isq:
            xp = Q + b * sq_b + t * sq_t + h0 * sq_h + d
            gp = DQO + b * sgq_b + t * sgq_t + h0 * sgq_h + d
            op = DQ + b * sdq_b + t * sdq_t + h0 * sdq_h
            w_ptr = QW
        else:
            xp = K + b * sk_b + t * sk_t + h0 * sk_h + d
            gp = DKO + b * sgk_b + t * sgk_t + h0 * sgk_h + d
            op = DK + b * sdk_b + t * sdk_t + h0 * sdk_h
            w_ptr = KW
        col = (1 - isq.to(tl.int32)) * (2 * HALF)  # [dqw | dkw] in a slot row
        pos = tl.load(POS + b * s_pb + t * s_pt, mask=m, other=0).to(tl.int64)
        c = tl.load(COS + pos * s_cos + d, eviction_policy=EV_C)
        s = tl.load(SIN + pos * s_cos + d, eviction_policy=EV_C)
        w1 = tl.load(w_ptr + d).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
        acc1 = tl.zeros((BT, HALF), dtype=tl.float32)
        acc2 = tl.zeros((BT, HALF), dtype=tl.float32)
        mh = (tok < tl.where(h0 < nh, NTOK, 0))[:, None]
        x1 = tl.load(xp, mask=mh, other=0.0, eviction_policy=EV_X)
        x2 = tl.load(xp + HALF, mask=mh, other=0.0, eviction_policy=EV_X)
        g1 = tl.load(gp, mask=mh, other=0.0, eviction_policy=EV_X)
        g2 = tl.load(gp + HALF, mask=mh, other=0.0, eviction_policy=EV_X)
        for i in tl.static_range(HG):
            if PREFETCH and i + 1 < HG:  # the next head's tiles in flight during this head's math
                mn = (tok < tl.where(h0 + i + 1 < nh, NTOK, 0))[:, None]
                nx1 = tl.load(xp + (i + 1) * sx_h, mask=mn, other=0.0, eviction_policy=EV_X)
                nx2 = tl.load(xp + (i + 1) * sx_h + HALF, mask=mn, other=0.0, eviction_policy=EV_X)
                ng1 = tl.load(gp + (i + 1) * sg_h, mask=mn, other=0.0, eviction_policy=EV_X)
                ng2 = tl.load(gp + (i + 1) * sg_h + HALF, mask=mn, other=0.0, eviction_policy=EV_X)
            acc1, acc2 = _group_head(op + i * so_h, w1, w2, c, s, mh, acc1, acc2, x1, x2, g1, g2, eps, HALF)
            if i + 1 < HG:
                mh = (tok < tl.where(h0 + i + 1 < nh, NTOK, 0))[:, None]
                if PREFETCH:
                    x1, x2, g1, g2 = nx1, nx2, ng1, ng2
                else:
                    x1 = tl.load(xp + (i + 1) * sx_h, mask=mh, other=0.0, eviction_policy=EV_X)
                    x2 = tl.load(xp + (i + 1) * sx_h + HALF, mask=mh, other=0.0, eviction_policy=EV_X)
                    g1 = tl.load(gp + (i + 1) * sg_h, mask=mh, other=0.0, eviction_policy=EV_X)
                    g2 = tl.load(gp + (i + 1) * sg_h + HALF, mask=mh, other=0.0, eviction_policy=EV_X)
        if COMPUTE_DW:
            row = ACC + (pid % NSLOT) * (4 * HALF) + col + tl.arange(0, HALF)
            tl.atomic_add(row, tl.sum(acc1, 0))
            tl.atomic_add(row + HALF, tl.sum(acc2, 0))


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


@triton.jit
def _tma_heads(XD, GD, O, W, ACC, POS, COS, SIN, col, pid, nprog, B, T, NH, s_pb, s_pt, s_cos, so_b, so_t, so_h,
               eps, HALF: tl.constexpr, BT: tl.constexpr, HG: tl.constexpr, NSLOT: tl.constexpr,
               COMPUTE_DW: tl.constexpr, NS: tl.constexpr):  # fmt: skip
    """Items (batch, BT-token block, group of HG heads) pid, pid + nprog, ... of one of q / k: x and g (B, T, NH,
    D) tiles by the tensor-memory engine, NS - 1 items ahead (shared memory holds what is in flight, not
    registers; heads past NH read as zeros and are not stored); cos/sin gathered once an item."""
    nblk = tl.cdiv(T, BT)
    ng = tl.cdiv(NH, HG)
    d = tl.arange(0, HALF)[None, :]
    r = tl.arange(0, BT)[:, None]
    w1 = tl.load(W + d).to(tl.float32)
    w2 = tl.load(W + HALF + d).to(tl.float32)
    acc1 = tl.zeros((BT, HALF), dtype=tl.float32)
    acc2 = tl.zeros((BT, HALF), dtype=tl.float32)
    for it in tl.range(pid, B * nblk * ng, nprog, num_stages=NS):
        h0 = it % ng * HG
        b = it // ng // nblk
        t0 = (it // ng % nblk) * BT
        t = t0 + r
        pos = tl.load(POS + b.to(tl.int64) * s_pb + t * s_pt, mask=t < T, other=0).to(tl.int64)
        c = tl.load(COS + pos * s_cos + d)
        s = tl.load(SIN + pos * s_cos + d)
        ob = O + b.to(tl.int64) * so_b + t.to(tl.int64) * so_t
        for i in tl.static_range(HG):
            x1 = tl.reshape(XD.load([b, t0, h0 + i, 0]), (BT, HALF))
            x2 = tl.reshape(XD.load([b, t0, h0 + i, HALF]), (BT, HALF))
            g1 = tl.reshape(GD.load([b, t0, h0 + i, 0]), (BT, HALF))
            g2 = tl.reshape(GD.load([b, t0, h0 + i, HALF]), (BT, HALF))
            m = t < tl.where(h0 + i < NH, T, 0)  # (a bool & in the interpreter fails)
            acc1, acc2 = _group_head(
                ob + (h0 + i) * so_h, w1, w2, c, s, m, acc1, acc2, x1, x2, g1, g2, eps, HALF
            )
    if COMPUTE_DW:
        row = ACC + (pid % NSLOT) * (4 * HALF) + col + tl.arange(0, HALF)
        tl.atomic_add(row, tl.sum(acc1, 0))
        tl.atomic_add(row + HALF, tl.sum(acc2, 0))


@triton.jit
def _tma_kernel(
    QD, KD, GQD, GKD, VD, QW, KW, DQ, DK, DVO, ACC, POS, COS, SIN,
    B, T, HQ, HK, s_pb, s_pt, s_cos, eps, sdq_b, sdq_t, sdq_h, sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
    HALF: tl.constexpr, BT: tl.constexpr, HG: tl.constexpr, NSLOT: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COPY_V: tl.constexpr, NS: tl.constexpr,
):  # fmt: skip
    """Persistent programs (a few per SM), each over every nprog-th (batch, token block, head) item: q's, then
    k's, then (COPY_V) v's gradient copied into its slice of the fused gradient. Inputs as tensor descriptors
    (B, T, H, D) with (1, BT, 1, HALF) blocks: tokens past T read as zeros."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    _tma_heads(QD, GQD, DQ, QW, ACC, POS, COS, SIN, 0, pid, nprog, B, T, HQ, s_pb, s_pt, s_cos,
               sdq_b, sdq_t, sdq_h, eps, HALF, BT, HG, NSLOT, COMPUTE_DW, NS)  # fmt: skip
    _tma_heads(KD, GKD, DK, KW, ACC, POS, COS, SIN, 2 * HALF, pid, nprog, B, T, HK, s_pb, s_pt, s_cos,
               sdk_b, sdk_t, sdk_h, eps, HALF, BT, HG, NSLOT, COMPUTE_DW, NS)  # fmt: skip
    if COPY_V:
        nblk = tl.cdiv(T, BT)
        d = tl.arange(0, HALF)[None, :]
        r = tl.arange(0, BT)[:, None]
        for it in tl.range(pid, B * nblk * HK, nprog, num_stages=NS):
            h = it % HK
            b = it // HK // nblk
            t0 = (it // HK % nblk) * BT
            t = t0 + r
            v1 = tl.reshape(VD.load([b, t0, h, 0]), (BT, HALF))
            v2 = tl.reshape(VD.load([b, t0, h, HALF]), (BT, HALF))
            op = DVO + b.to(tl.int64) * sdv_b + t.to(tl.int64) * sdv_t + h * sdv_h + d
            tl.store(op, v1, mask=t < T)
            tl.store(op + HALF, v2, mask=t < T)
