"""Per-head paged prefill attention: any chunk, flash-attention tiles of BLOCK_M queries of one head.

A cold prompt's chunk (or the mixed step's prefill tiles): one program per (sequence, query block, head), or
per (tile, head[, split]) over a padded work list (TILED: the CUDA graphs' form). Split-K (NUM_SPLITS > 1)
writes partial outputs that ``_prefill_merge_kernel`` merges: the fallback of the split prefill
(``_prefill_split_kernel.py``) when the key step is not a multiple of the page or the tickets run out.
Launcher: ``paged_prefill.paged_prefill``; the torch reference: ``paged_attention.paged_attention_ref``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmray.kernels._paged_attention_kernels import _kv_rows


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_ptr,
    context_lens_ptr,
    tile_seq_ptr,  # TILED: program i works on tile (tile_seq[i], tile_m[i]); tile_seq < 0 = no work
    tile_m_ptr,
    k_scale_ptr,
    v_scale_ptr,
    out_ptr,
    part_out_ptr,  # NUM_SPLITS > 1: (N, H, S, D) fp32 partial outputs, (N, H, S) their log2-sum-exp
    part_lse_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
    H: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    TILED: tl.constexpr,
    FP8: tl.constexpr,
    CDT: tl.constexpr,
):
    split = 0
    if TILED:
        sq = tl.load(tile_seq_ptr + tl.program_id(0))
        mblk = tl.load(tile_m_ptr + tl.program_id(0))
        h = tl.program_id(1)
        split = tl.program_id(2)  # split-K: keys [split * per_split, +per_split) of the tile's range
        if sq < 0:
            return
    else:
        sq = tl.program_id(0)
        mblk = tl.program_id(1)
        h = tl.program_id(2)
    q_start = tl.load(query_start_ptr + sq)
    q_len = tl.load(query_start_ptr + sq + 1) - q_start
    if mblk * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens_ptr + sq)
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    prefix = ctx - q_len  # tokens cached before this chunk
    kvh = h // GROUP
    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < q_len
    q_pos = prefix + offs_m
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + d[None, :],
        mask=mmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(CDT)  # (BLOCK_M, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(ctx, prefix + (mblk + 1) * BLOCK_M)  # keys past the tile's last query are masked
    start = 0
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tl.cdiv(end, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * per_split
        if start >= end:
            return  # an empty split: the merge reads only the splits that hold keys
        end = tl.minimum(end, start + per_split)
    table = block_tables_ptr + sq * stride_bt  # (this sequence's block-table row)
    for n0 in range(start, end, BLOCK_N):
        offs_n, nmask, addr, kv_mask = _kv_rows(
            table, n0, end, kvh, dmask, stride_cb, stride_cs, stride_ch, PAGE, BLOCK_N, False, True
        )
        k = tl.load(k_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(CDT)), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(nmask[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0).to(CDT)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    if FP8:
        acc = acc * tl.load(v_scale_ptr)
    if NUM_SPLITS == 1:
        out = acc / l_sum[:, None]
        tl.store(
            out_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mmask[:, None] & dmask[None, :],
        )
    else:  # a row whose keys in this split are all in its future has l = 0: weight 0 in the merge
        nonempty = l_sum > 0
        out = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_sum, 1.0)[:, None], 0.0)
        lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l_sum, 1.0)), float("-inf"))
        row = ((q_start + offs_m).to(tl.int64) * H + h) * NUM_SPLITS + split
        tl.store(part_out_ptr + row[:, None] * D + d[None, :], out, mask=mmask[:, None] & dmask[None, :])
        tl.store(part_lse_ptr + row, lse, mask=mmask)


@triton.jit
def _prefill_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    query_start_ptr,
    context_lens_ptr,
    tile_seq_ptr,
    tile_m_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next power of two >= NUM_SPLITS
    R: tl.constexpr,  # query rows per program (grid dim 2 = BLOCK_M // R)
):
    """One program per (tile, head, R rows): all splits' partial outputs of its rows in one load wave (no chain
    over splits), weighted by exp2(lse - max) and summed."""
    sq = tl.load(tile_seq_ptr + tl.program_id(0))
    mblk = tl.load(tile_m_ptr + tl.program_id(0))
    h = tl.program_id(1)
    if sq < 0:
        return
    q_start = tl.load(query_start_ptr + sq)
    q_len = tl.load(query_start_ptr + sq + 1) - q_start
    r0 = mblk * BLOCK_M + tl.program_id(2) * R
    if r0 >= q_len:
        return
    ctx = tl.load(context_lens_ptr + sq)
    end = tl.minimum(ctx, ctx - q_len + (mblk + 1) * BLOCK_M)
    per_split = tl.cdiv(tl.cdiv(end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    used = tl.cdiv(end, per_split)  # splits that hold keys (the kernel wrote only those)
    offs_m = r0 + tl.arange(0, R)
    mmask = offs_m < q_len
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    rows = ((q_start + offs_m).to(tl.int64) * H + h) * NUM_SPLITS  # (R,)
    lmask = (sp < used)[:, None] & mmask[None, :]
    lse = tl.load(part_lse_ptr + rows[None, :] + sp[:, None], mask=lmask, other=float("-inf"))  # (S, R)
    m = tl.max(lse, 0)  # split 0 holds key 0, which every row sees: finite for the rows in range
    m = tl.where(mmask, m, 0.0)
    w = tl.exp2(lse - m[None, :])  # (S, R), 0 for splits without keys
    o = tl.load(
        part_out_ptr + (rows[None, :, None] + sp[:, None, None]) * D + d[None, None, :],
        mask=lmask[:, :, None] & dmask[None, None, :],
        other=0.0,
    )  # (S, R, BLOCK_D)
    out = tl.sum(o * w[:, :, None], 0) / tl.where(mmask, tl.sum(w, 0), 1.0)[:, None]
    tl.store(
        out_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mmask[:, None] & dmask[None, :],
    )
