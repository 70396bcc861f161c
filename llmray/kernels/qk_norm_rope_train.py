"""Training's per-head q/k RMSNorm + rotary embedding: one launch forward, one backward (autograd).

The forward is the inference kernel (``llmray.kernels.qk_norm_rope``: norm, round to the input dtype, rotate);
the backward recomputes each row's 1/rms from the saved input and, per token and head, rotates the incoming
gradient back (rope by -angle) and applies RMSNorm's backward:
    g  = rope^-1(dy)                     (the gradient at the normed, rounded value)
    dx = (w g - x_hat mean(x_hat w g)) / rms,   dw = sum over rows of g x_hat
Unfused, the training step runs rms_norm on q, on k, and rope, each forward and backward (six passes over
q/k); fused it is two: the rope pass is gone. A backward program walks a range of tokens and keeps fp32
partial weight gradients in registers, summed by ``rmsnorm``'s one-pass dW kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels._common import interpreting, num_sms
from llmray.kernels.qk_norm_rope import qk_norm_rope
from llmray.kernels.rmsnorm import DW_SUM, _sum_partials
from llmray.kernels.rope import _token_cos_sin

__all__ = ["qk_norm_rope_train", "qkv_norm_rope_train"]


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
    # rope backward: rotate by -angle (c, s broadcast over heads)
    n1 = g1 * c + g2 * s
    n2 = g2 * c - g1 * s
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(w_ptr + d).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + d).to(tl.float32)[None, :]
    xh1, xh2 = x1 * rstd, x2 * rstd
    mean = (tl.sum(xh1 * w1 * n1, 1) + tl.sum(xh2 * w2 * n2, 1))[:, None] / (2 * HALF)
    dx1 = (w1 * n1 - xh1 * mean) * rstd
    dx2 = (w2 * n2 - xh2 * mean) * rstd
    out = dst + h[:, None] * so_h + d[None, :]
    tl.store(out, dx1.to(dst.dtype.element_ty), mask=m)
    tl.store(out + HALF, dx2.to(dst.dtype.element_ty), mask=m)
    return tl.sum(n1 * xh1, 0), tl.sum(n2 * xh2, 0)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    Q, K, DQO, DKO, QW, KW, DQ, DK, DQW_PART, DKW_PART, POS, COS, SIN,
    T, NTOK, tok_per_prog, HQ, HK, s_pb, s_pt, s_cos, eps,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sgq_b, sgq_t, sgq_h, sgk_b, sgk_t, sgk_h,
    sdq_b, sdq_t, sdq_h, sdk_b, sdk_t, sdk_h, DVI, DVO, sv_b, sv_t, sv_h, sdv_b, sdv_t, sdv_h,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COPY_V: tl.constexpr,
):  # fmt: skip
    """Q, K (saved inputs), DQO, DKO (incoming gradients), DQ, DK (outputs): (B, T, H, D) with any
    (b, t, h) strides and unit stride along D (views of a fused q|k|v row, cuDNN's gradient layouts)."""
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
            if COPY_V:
                _copy_v(
                    DVI, DVO, tok, T, NTOK, sv_b, sv_t, sv_h, sdv_b, sdv_t, sdv_h, HK, 2 * HALF, BLOCK_HK, 1
                )
    if COMPUTE_DW:
        tl.store(DQW_PART + pid * 2 * HALF + d, aq1)
        tl.store(DQW_PART + pid * 2 * HALF + HALF + d, aq2)
        tl.store(DKW_PART + pid * 2 * HALF + d, ak1)
        tl.store(DKW_PART + pid * 2 * HALF + HALF + d, ak2)


@triton.jit
def _copy_v(DVI, DVO, tok0, T, NTOK, svb, svt, svh, sob, sot, soh, HK, D2: tl.constexpr, BH: tl.constexpr,
            BT: tl.constexpr):  # fmt: skip
    """BT tokens' v gradients (HK heads x D2) copied into their slice of the fused q|k|v gradient."""
    r = tl.arange(0, BT * BH)
    tok = tok0 + r // BH
    h = (r % BH).to(tl.int64)
    m = ((tok < NTOK) & (h < HK))[:, None]
    b = (tok // T).to(tl.int64)
    t = (tok % T).to(tl.int64)
    d = tl.arange(0, D2)[None, :]
    v = tl.load(DVI + (b * svb + t * svt + h * svh)[:, None] + d, mask=m, other=0.0)
    tl.store(DVO + (b * sob + t * sot + h * soh)[:, None] + d, v, mask=m)


@triton.jit
def _rows_bwd(
    src, dsrc, dst, w_ptr, POS, COS, SIN, tok0, T, NTOK, s_pb, s_pt, s_cos,
    sb, st, sh, gb, gt, gh, ob, ot, oh, n_heads, eps, HALF: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    """BT tokens x BH heads as (BT * BH, HALF) row tiles (one row per token and head): dx into dst; returns
    the two halves of sum over rows of g * x_hat for dW."""
    r = tl.arange(0, BT * BH)
    tok = tok0 + r // BH
    h = (r % BH).to(tl.int64)
    live = tok < NTOK
    m = (live & (h < n_heads))[:, None]
    b = (tok // T).to(tl.int64)
    t = (tok % T).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    pos = tl.load(POS + b * s_pb + t * s_pt, mask=live, other=0).to(tl.int64)[:, None]
    c = tl.load(COS + pos * s_cos + d)  # (rows, HALF): each token's angles, once per head (cached)
    s = tl.load(SIN + pos * s_cos + d)
    xp = src + (b * sb + t * st + h * sh)[:, None] + d
    gp = dsrc + (b * gb + t * gt + h * gh)[:, None] + d
    x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
    g1 = tl.load(gp, mask=m, other=0.0).to(tl.float32)
    g2 = tl.load(gp + HALF, mask=m, other=0.0).to(tl.float32)
    n1 = g1 * c + g2 * s
    n2 = g2 * c - g1 * s
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(w_ptr + d).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
    xh1, xh2 = x1 * rstd, x2 * rstd
    mean = (tl.sum(xh1 * w1 * n1, 1) + tl.sum(xh2 * w2 * n2, 1))[:, None] / (2 * HALF)
    op = dst + (b * ob + t * ot + h * oh)[:, None] + d
    tl.store(op, ((w1 * n1 - xh1 * mean) * rstd).to(dst.dtype.element_ty), mask=m)
    tl.store(op + HALF, ((w2 * n2 - xh2 * mean) * rstd).to(dst.dtype.element_ty), mask=m)
    return tl.sum(n1 * xh1, 0), tl.sum(n2 * xh2, 0)


@triton.jit
def _qk_norm_rope_bwd_rows_kernel(
    Q, K, DQO, DKO, QW, KW, DQ, DK, DQW_PART, DKW_PART, POS, COS, SIN,
    T, NTOK, HQ, HK, s_pb, s_pt, s_cos, eps,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sgq_b, sgq_t, sgq_h, sgk_b, sgk_t, sgk_h,
    sdq_b, sdq_t, sdq_h, sdk_b, sdk_t, sdk_h, DVI, DVO, sv_b, sv_t, sv_h, sdv_b, sdv_t, sdv_h,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BT: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COPY_V: tl.constexpr,
):  # fmt: skip
    """As ``_qk_norm_rope_bwd_kernel``, BT tokens per iteration as row tiles; programs stride over the token
    blocks (program p takes blocks p, p + P, ...)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    aq1 = tl.zeros((HALF,), dtype=tl.float32)
    aq2 = tl.zeros((HALF,), dtype=tl.float32)
    ak1 = tl.zeros((HALF,), dtype=tl.float32)
    ak2 = tl.zeros((HALF,), dtype=tl.float32)
    for tb in range(pid, tl.cdiv(NTOK, BT), nprog):
        tok0 = tb * BT
        q1, q2 = _rows_bwd(
            Q, DQO, DQ, QW, POS, COS, SIN, tok0, T, NTOK, s_pb, s_pt, s_cos,
            sq_b, sq_t, sq_h, sgq_b, sgq_t, sgq_h, sdq_b, sdq_t, sdq_h, HQ, eps, HALF, BLOCK_HQ, BT,
        )  # fmt: skip
        k1, k2 = _rows_bwd(
            K, DKO, DK, KW, POS, COS, SIN, tok0, T, NTOK, s_pb, s_pt, s_cos,
            sk_b, sk_t, sk_h, sgk_b, sgk_t, sgk_h, sdk_b, sdk_t, sdk_h, HK, eps, HALF, BLOCK_HK, BT,
        )  # fmt: skip
        aq1 += q1
        aq2 += q2
        ak1 += k1
        ak2 += k2
        if COPY_V:
            _copy_v(
                DVI, DVO, tok0, T, NTOK, sv_b, sv_t, sv_h, sdv_b, sdv_t, sdv_h, HK, 2 * HALF, BLOCK_HK, BT
            )
    if COMPUTE_DW:
        d = tl.arange(0, HALF)
        tl.store(DQW_PART + pid * 2 * HALF + d, aq1)
        tl.store(DQW_PART + pid * 2 * HALF + HALF + d, aq2)
        tl.store(DKW_PART + pid * 2 * HALF + d, ak1)
        tl.store(DKW_PART + pid * 2 * HALF + HALF + d, ak2)


@triton.jit
def _copy_rows_kernel(SRC, DST, M, s_src, s_dst, N: tl.constexpr, BM: tl.constexpr):
    """DST[r, :N] = SRC[r, :N] for M rows with their own row strides (v's gradient into the fused gradient)."""
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    c = tl.arange(0, N)
    m = (r < M)[:, None]
    r64 = r.to(tl.int64)[:, None]
    tl.store(DST + r64 * s_dst + c[None, :], tl.load(SRC + r64 * s_src + c[None, :], mask=m), mask=m)


def _copy_rows(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst.copy_(src) for (B, T, H, D) views whose tokens are rows (unit strides inside a token's H x D)."""
    b, t, h, d = dst.shape
    n = h * d
    rows_ok = all(
        x.stride(3) == 1 and x.stride(2) == d and x.stride(0) == t * x.stride(1) for x in (src, dst)
    )
    if not COPY_ROWS or not rows_ok or n & (n - 1) or (dst.device.type != "cuda" and not interpreting()):
        dst.copy_(src)
        return
    bm = max(1, 4096 // n)
    _copy_rows_kernel[(triton.cdiv(b * t, bm),)](
        src, dst, b * t, src.stride(1), dst.stride(1), N=n, BM=bm, num_warps=8
    )


COPY_ROWS = (
    True  # the v gradient's copy by _copy_rows_kernel (vs torch's strided copy_: 62 us a layer on the H200)
)

# backward launch knobs (the GPU A/B sets them): ROWS_BT > 0 takes the row-tile kernel with that many tokens a
# tile; PROGRAMS_PER_SM / NUM_WARPS None = the heuristics below
ROWS_BT = 0
COPY_V = False  # the fused q|k|v backward copies v's gradient in the q/k pass (else a copy_ kernel)
PROGRAMS_PER_SM: int | None = None
NUM_WARPS: int | None = None


def _programs(ntok: int, device: torch.device) -> int:
    """Backward programs: each walks ntok / programs tokens one at a time, so enough of them must be
    resident for the loads in flight (H200, 16k tokens x 24 heads x 128: 4 per SM took 213 us a layer,
    2x the time its bytes need); the fp32 partial dW rows (programs x D) stay small."""
    per_sm = (
        PROGRAMS_PER_SM or 8
    )  # W2 H200 sweep (fused q|k|v backward incl. dv copy): 8 0.375 ms, 16 0.458, 32 0.483
    return max(1, min(ntok, per_sm * num_sms(device) if device.type == "cuda" else 4))


def _unit_d(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along the head dim (a copy only if it has none)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _backward(ctx, q, k, qw, kw, positions, cos, sin, dqo, dko, dq, dk, dv=None, dv_out=None):
    """dq, dk (given outputs, any (b, t, h) strides) and the weights' gradients of rope(norm(q/k)); with
    ``dv``/``dv_out`` (``COPY_V``) the same pass copies v's gradient into its slice of the fused gradient."""
    dqo, dko = _unit_d(dqo), _unit_d(dko)
    copy_v = dv is not None and dv_out is not None and COPY_V
    if copy_v:
        dv = _unit_d(dv)
    vs = (*dv.stride()[:3], *dv_out.stride()[:3]) if copy_v else (0,) * 6
    dvi, dvo = (dv, dv_out) if copy_v else (dq, dq)
    bsz, t, hq, d = q.shape
    hk = k.shape[2]
    ntok = bsz * t
    want_dw = ctx.needs_input_grad[ctx.w_index] or ctx.needs_input_grad[ctx.w_index + 1]
    progs = _programs(ntok, q.device)
    per = triton.cdiv(ntok, progs)
    progs = triton.cdiv(ntok, per)
    cos, sin = cos.contiguous(), sin.contiguous()
    pos = positions.expand(bsz, t)
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    warps = NUM_WARPS or (4 if (block_hq + block_hk) * d >= 2048 else 2)
    if ROWS_BT > 0:
        progs = min(progs, triton.cdiv(ntok, ROWS_BT))
        part = torch.empty((2, progs, d), device=q.device, dtype=torch.float32)
        _qk_norm_rope_bwd_rows_kernel[(progs,)](
            q, k, dqo, dko, qw, kw, dq, dk, part[0], part[1], pos, cos, sin,
            t, ntok, hq, hk, *pos.stride(), cos.stride(0), ctx.eps,
            *q.stride()[:3], *k.stride()[:3], *dqo.stride()[:3], *dko.stride()[:3], *dq.stride()[:3],
            *dk.stride()[:3], dvi, dvo, *vs,
            HALF=d // 2, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BT=ROWS_BT, COMPUTE_DW=want_dw, COPY_V=copy_v,
            num_warps=warps,
        )  # fmt: skip
    else:
        part = torch.empty((2, progs, d), device=q.device, dtype=torch.float32)
        _launch_tokens(q, k, dqo, dko, qw, kw, dq, dk, part, pos, cos, sin, t, ntok, per, hq, hk, ctx.eps,
                       d, block_hq, block_hk, want_dw, warps, progs, dvi, dvo, vs, copy_v)  # fmt: skip
    dqw = _sum_partials(part[0], qw.dtype, DW_SUM) if ctx.needs_input_grad[ctx.w_index] else None
    dkw = _sum_partials(part[1], kw.dtype, DW_SUM) if ctx.needs_input_grad[ctx.w_index + 1] else None
    return dqw, dkw, copy_v


def _launch_tokens(q, k, dqo, dko, qw, kw, dq, dk, part, pos, cos, sin, t, ntok, per, hq, hk, eps, d,
                   block_hq, block_hk, want_dw, warps, progs, dvi, dvo, vs, copy_v):  # fmt: skip
    _qk_norm_rope_bwd_kernel[(progs,)](
        q, k, dqo, dko, qw, kw, dq, dk, part[0], part[1], pos, cos, sin,
        t, ntok, per, hq, hk, *pos.stride(), cos.stride(0), eps,
        *q.stride()[:3], *k.stride()[:3], *dqo.stride()[:3], *dko.stride()[:3], *dq.stride()[:3], *dk.stride()[:3],
        dvi, dvo, *vs,
        HALF=d // 2, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, COMPUTE_DW=want_dw, COPY_V=copy_v, num_warps=warps,
    )  # fmt: skip


class _QKNormRopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, qw, kw, eps: float, positions, cos, sin):
        q, k = _unit_d(q), _unit_d(k)  # (B, T, H, D) projections: any (b, t, h) strides
        qo, ko = qk_norm_rope(q, k, qw, kw, eps, positions, cos, sin)
        ctx.save_for_backward(q, k, qw, kw, positions, cos, sin)
        ctx.eps, ctx.w_index = eps, 2
        return qo, ko

    @staticmethod
    def backward(ctx, dqo: torch.Tensor, dko: torch.Tensor):
        q, k, qw, kw, positions, cos, sin = ctx.saved_tensors
        dq, dk = (
            torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
        )
        dqw, dkw, _ = _backward(ctx, q, k, qw, kw, positions, cos, sin, dqo, dko, dq, dk)
        return dq, dk, dqw, dkw, None, None, None, None


class _QKVNormRopeFn(torch.autograd.Function):
    """One fused (B, T, (Hq + 2 Hkv) D) q|k|v projection -> rope(norm(q)), rope(norm(k)), v (a view).

    The backward writes dq, dk and dv into one (B, T, (Hq + 2 Hkv) D) gradient, so the fused projection's
    input gradient is one GEMM and no cat of three gradients is made."""

    @staticmethod
    def forward(ctx, qkv, qw, kw, eps: float, positions, cos, sin, hq: int, hk: int):
        bsz, t, width = qkv.shape
        d = width // (hq + 2 * hk)
        q = qkv[..., : hq * d].view(bsz, t, hq, d)  # strided views of the fused row
        k = qkv[..., hq * d : (hq + hk) * d].view(bsz, t, hk, d)
        v = qkv[..., (hq + hk) * d :].view(bsz, t, hk, d)
        qo, ko = qk_norm_rope(q, k, qw, kw, eps, positions, cos, sin)
        ctx.save_for_backward(qkv, qw, kw, positions, cos, sin)
        ctx.eps, ctx.w_index, ctx.heads = eps, 1, (hq, hk, d)
        return qo, ko, v

    @staticmethod
    def backward(ctx, dqo: torch.Tensor, dko: torch.Tensor, dv: torch.Tensor | None):
        qkv, qw, kw, positions, cos, sin = ctx.saved_tensors
        hq, hk, d = ctx.heads
        bsz, t, _ = qkv.shape
        dqkv = torch.empty_like(qkv)
        q = qkv[..., : hq * d].view(bsz, t, hq, d)
        k = qkv[..., hq * d : (hq + hk) * d].view(bsz, t, hk, d)
        dq = dqkv[..., : hq * d].view(bsz, t, hq, d)
        dk = dqkv[..., hq * d : (hq + hk) * d].view(bsz, t, hk, d)
        dvs = dqkv[..., (hq + hk) * d :].view(bsz, t, hk, d)
        dqw, dkw, copied = _backward(ctx, q, k, qw, kw, positions, cos, sin, dqo, dko, dq, dk, dv, dvs)
        if dv is None:
            dvs.zero_()
        elif not copied:
            _copy_rows(dv, dvs)
        return dqkv, dqw, dkw, None, None, None, None, None, None


def qk_norm_rope_train(
    q: torch.Tensor,  # (B, T, H, D)
    k: torch.Tensor,  # (B, T, Hkv, D)
    q_weight: torch.Tensor,  # (D,)
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,  # (B, T)
    cos: torch.Tensor,  # (max_pos, D/2) fp32 constants
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rope(rms_norm(q, q_weight), rms_norm(k, k_weight)), differentiable in q, k and both weights."""
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("the cos/sin tables are constants; they must not require grad")
    if q.dtype != k.dtype or q_weight.dtype != k_weight.dtype:
        raise ValueError(f"q/k and their weights must share dtypes, got {q.dtype}, {k.dtype}")
    d = q.shape[-1]
    if d % 2 or d & (d - 1):  # the fused kernels take power-of-2 head dims; others: the three ops
        from llmray.kernels.rmsnorm import rms_norm
        from llmray.kernels.rope import rope

        return rope(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), positions, cos, sin)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, q_weight, k_weight)):
        return _QKNormRopeFn.apply(q, k, q_weight, k_weight, eps, positions, cos, sin)
    return qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos, sin)


def qkv_norm_rope_train(
    qkv: torch.Tensor,  # (B, T, (Hq + 2 Hkv) D): the fused q|k|v projection
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rope(norm(q)), rope(norm(k)), v) of a fused projection, differentiable in qkv and both weights;
    one (B, T, (Hq + 2 Hkv) D) input gradient (power-of-2 head dims: the callers check)."""
    if qkv.dim() != 3 or qkv.stride(-1) != 1 or qkv.shape[-1] % (num_heads + 2 * num_kv_heads):
        raise ValueError(
            f"qkv_norm_rope_train needs (B, T, (H + 2 Hkv) D) with unit last stride, got {qkv.shape}"
        )
    out = _QKVNormRopeFn.apply(qkv, q_weight, k_weight, eps, positions, cos, sin, num_heads, num_kv_heads)
    return out[0], out[1], out[2]
