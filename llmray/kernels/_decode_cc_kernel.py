"""Paged decode on CUDA cores (no ``tl.dot``): an experimental variant of ``_decode_kernel`` for small GQA groups.

Same arguments and outputs as ``_decode_kernel`` (launched by ``paged_decode`` with config[5] set). The
matrix-unit kernel pads a group of 2 query heads to 16 MMA rows and, for an fp8 cache, feeds V to the MMA
through per-element shared-memory loads (8-bit operands have no transposing ``ldmatrix``). Here each
score is a dot product over head_dim and each output row a p-weighted sum of V rows, both as fp32
broadcast-multiply-reduce (as FlashInfer's decode does on CUDA cores): no padding, no transpose.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode_cc_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, query_start_ptr, k_scale_ptr,
    v_scale_ptr, out_ptr, part_out_ptr, part_lse_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs, stride_ch,
    H: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    INDIRECT: tl.constexpr, FP8: tl.constexpr, CDT: tl.constexpr, PREFETCH: tl.constexpr = False,
    HEADS_FAST: tl.constexpr = False,
):  # fmt: skip
    if HEADS_FAST:
        kvh = tl.program_id(0)
        b = tl.program_id(1)
    else:
        b = tl.program_id(0)
        kvh = tl.program_id(1)
    split = tl.program_id(2)
    tok = b
    if INDIRECT:
        tok = tl.load(query_start_ptr + b)
        if tl.load(query_start_ptr + b + 1) - tok != 1:
            return
    ctx = tl.load(context_lens_ptr + b)
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < D
    q = tl.load(
        q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(tl.float32)  # (BLOCK_G, BLOCK_D)
    q = q * qk_scale  # scores come out already scaled (base 2)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < end
        page = tl.load(block_tables_ptr + b * stride_bt + offs // PAGE, mask=nmask, other=0).to(tl.int64)
        addr = page * stride_cb + (offs % PAGE) * stride_cs + kvh * stride_ch
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (BLOCK_G, BLOCK_N)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    if FP8:
        acc = acc * tl.load(v_scale_ptr)

    omask = gmask[:, None] & dmask[None, :]
    if NUM_SPLITS == 1:
        out = acc / l_sum[:, None]
        tl.store(
            out_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=omask,
        )
    else:
        nonempty = l_sum > 0
        out = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_sum, 1.0)[:, None], 0.0)
        lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l_sum, 1.0)), float("-inf"))
        row = (b * H + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + row[:, None] * D + d[None, :], out, mask=omask)
        tl.store(part_lse_ptr + row, lse, mask=gmask)
