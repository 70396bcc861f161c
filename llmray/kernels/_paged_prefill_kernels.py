"""Split-K prefill attention for short chunks after long cached prefixes, with the merge in the same launch.

A prefix hit's step (48 new tokens after 2,000 cached) has one 64-token tile per head: the keys must be split
over many programs to spread the KV reads over the SMs, and the partial outputs merged. Here:
- a program covers BLOCK_R query rows of one KV head, rows = (token, GQA head) pairs of the tile (token-major,
  so a program's q rows are contiguous in memory): each K/V tile is loaded once for the whole GQA group;
- the last program of a (tile, KV head, row block) to finish (an atomic ticket per group, reset to 0 by that
  program for the next launch) merges the group's splits (log-sum-exp weights) and writes the output: no
  second kernel, no launch gap between the two phases.
Also the per-head prefill kernel (any chunk; split-K with a separate merge kernel). Launcher:
``paged_prefill.paged_prefill``; the torch reference: ``paged_attention.paged_attention_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels._paged_attention_kernels import _page_slot

_TICKETS: dict[torch.device, torch.Tensor] = {}
TICKET_SLOTS = 1 << 16  # (tile, KV head, row block) groups one launch may use


def tickets(device: torch.device, n: int) -> torch.Tensor | None:
    """The zeroed int32 ticket counters of ``device`` (kept zero between launches by the kernel itself), or
    None when ``n`` groups do not fit. Allocated once per device (first call: outside a CUDA graph capture)."""
    if n > TICKET_SLOTS:
        return None
    buf = _TICKETS.get(device)
    if buf is None:
        buf = _TICKETS[device] = torch.zeros(TICKET_SLOTS, dtype=torch.int32, device=device)
    return buf


@triton.jit
def _prefill_gqa_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_ptr,
    context_lens_ptr,
    tile_seq_ptr,  # program (i, ., .) works on tile (tile_seq[i], tile_m[i]); tile_seq < 0 = no work
    tile_m_ptr,
    k_scale_ptr,
    v_scale_ptr,
    out_ptr,
    part_out_ptr,  # NUM_SPLITS > 1: (N, H, S, D) fp32 or bf16 partial outputs, (N, H, S) their log2-sum-exp
    part_lse_ptr,
    ticket_ptr,  # (grid0 * grid1,) int32 zeros: arrivals per (tile, KV head, row block)
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
    BLOCK_M: tl.constexpr,  # query tokens per tile (the work list's unit)
    BLOCK_R: tl.constexpr,  # query rows (token, head) per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    BLOCK_S: tl.constexpr,  # next power of two >= NUM_SPLITS
    MERGE_C: tl.constexpr,  # splits per load wave of the merge (a power of two <= BLOCK_S)
    MERGE_BCAST: tl.constexpr,  # the merge's weights through global memory, read back per split as (BLOCK_R, 1)
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,
    CDT: tl.constexpr,
    FAST_ADDR: tl.constexpr,
    I64: tl.constexpr,
):
    RB: tl.constexpr = (BLOCK_M * GROUP + BLOCK_R - 1) // BLOCK_R  # row blocks per tile and KV head
    tile = tl.program_id(0)
    group_id = tile * tl.num_programs(1) + tl.program_id(1)
    kvh = tl.program_id(1) // RB
    rb = tl.program_id(1) % RB
    split = tl.program_id(2)
    sq = tl.load(tile_seq_ptr + tile)
    if sq < 0:
        return
    mblk = tl.load(tile_m_ptr + tile)
    q_start = tl.load(query_start_ptr + sq)
    q_len = tl.load(query_start_ptr + sq + 1) - q_start
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # row in the tile: token r // GROUP, head r % GROUP
    tok = mblk * BLOCK_M + r // GROUP  # token index in the sequence's chunk
    rmask = (r < BLOCK_M * GROUP) & (tok < q_len)
    first = mblk * BLOCK_M + (rb * BLOCK_R) // GROUP
    if first >= q_len:
        return
    last = tl.minimum(mblk * BLOCK_M + ((rb + 1) * BLOCK_R - 1) // GROUP, q_len - 1)
    last = tl.minimum(last, (mblk + 1) * BLOCK_M - 1)
    ctx = tl.load(context_lens_ptr + sq)
    prefix = ctx - q_len  # tokens cached before this chunk
    end = prefix + last + 1  # keys past the block's last query are masked for every row
    per_split = tl.cdiv(tl.cdiv(end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    if start >= end:
        return  # an empty split: not counted in ``used``
    stop = tl.minimum(end, start + per_split)
    used = tl.cdiv(end, per_split)
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    head = kvh * GROUP + r % GROUP
    q_pos = prefix + tok
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    io_mask = rmask[:, None] & dmask[None, :]
    q = tl.load(
        q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=io_mask,
        other=0.0,
    ).to(CDT)  # (BLOCK_R, BLOCK_D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    table = block_tables_ptr + sq * stride_bt
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < stop
        page, slot = _page_slot(table, n0, offs_n, nmask, PAGE, BLOCK_N, FAST_ADDR, I64)
        addr = page * stride_cb + slot * stride_cs + kvh * stride_ch
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(CDT)), input_precision=PRECISION) * qk_scale  # (BLOCK_R, BLOCK_N)
        s = tl.where(nmask[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0).to(CDT)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    if FP8:
        acc = acc * tl.load(v_scale_ptr)
    o_ptrs = out_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    if NUM_SPLITS == 1:
        tl.store(o_ptrs, (acc / l_sum[:, None]).to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # a row whose keys in this split are all in its future has l = 0: weight 0 in the merge
        nonempty = l_sum > 0
        own = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_sum, 1.0)[:, None], 0.0)
        lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l_sum, 1.0)), float("-inf"))
        rows = ((q_start + tok).to(tl.int64) * H + head) * NUM_SPLITS  # (BLOCK_R,) split 0's row
        own_p = own.to(part_out_ptr.dtype.element_ty)  # (fp32, or bf16: half the merge's bytes)
        tl.store(part_out_ptr + (rows + split)[:, None] * D + d[None, :], own_p, mask=io_mask)
        tl.store(part_lse_ptr + rows + split, lse, mask=rmask)
        tl.debug_barrier()  # every thread's partials are written before the ticket releases them
        ticket = tl.atomic_add(ticket_ptr + group_id, 1, sem="acq_rel", scope="gpu")
        if ticket == used - 1:  # the last of the group's splits: merge them all
            tl.store(ticket_ptr + group_id, 0)  # (the others are done with it: ready for the next launch)
            # every split's lse of the block's rows in one load, then the partial outputs MERGE_C splits at a
            # time as (BLOCK_R, MERGE_C, D) loads: few load waves and layout changes (one per split, each with
            # a barrier, made the merge ~1.3 us per split on the H200)
            sp = tl.arange(0, BLOCK_S)
            lmask = rmask[:, None] & (sp < used)[None, :]
            lse_all = tl.load(
                part_lse_ptr + rows[:, None] + sp[None, :],
                mask=lmask,
                other=float("-inf"),
                cache_modifier=".cg",
            )  # (BLOCK_R, BLOCK_S)
            mx = tl.max(lse_all, 1)
            mx = tl.where(mx == float("-inf"), 0.0, mx)  # (rows out of range)
            if MERGE_BCAST:
                # the normalised weights replace the lse (this block's rows are the last program's now) and are
                # read back as (BLOCK_R, 1) next to each split's (BLOCK_R, D) partials: no layout change in the loop
                w_all = tl.exp2(lse_all - mx[:, None])
                w_all = w_all / tl.where(rmask, tl.sum(w_all, 1), 1.0)[:, None]
                tl.store(part_lse_ptr + rows[:, None] + sp[None, :], w_all, mask=lmask)
                tl.debug_barrier()  # (the CTA's global writes are visible to all its threads after the barrier)
                res = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
                for s_i in tl.static_range(NUM_SPLITS):
                    sel = tl.zeros([BLOCK_R], tl.int32) + s_i  # (a vector: the CPU interpreter's masks)
                    smask = rmask & (sel < used)
                    w_i = tl.load(
                        part_lse_ptr + rows[:, None] + s_i,
                        mask=smask[:, None],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    o_i = tl.load(
                        part_out_ptr + (rows + s_i)[:, None] * D + d[None, :],
                        mask=smask[:, None] & dmask[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    ).to(tl.float32)
                    res += o_i * w_i
                tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=io_mask)
            else:
                res = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
                den = tl.zeros([BLOCK_R], tl.float32)
                for c0 in tl.static_range(0, BLOCK_S, MERGE_C):
                    spc = c0 + tl.arange(0, MERGE_C)
                    cmask = rmask[:, None] & (spc < used)[None, :]  # (BLOCK_R, MERGE_C)
                    lse_c = tl.load(
                        part_lse_ptr + rows[:, None] + spc[None, :],
                        mask=cmask,
                        other=float("-inf"),
                        cache_modifier=".cg",
                    )
                    w_c = tl.exp2(lse_c - mx[:, None])  # 0 for splits without keys
                    o_c = tl.load(
                        part_out_ptr + (rows[:, None] + spc[None, :])[:, :, None] * D + d[None, None, :],
                        mask=cmask[:, :, None] & dmask[None, None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    ).to(tl.float32)  # (BLOCK_R, MERGE_C, BLOCK_D)
                    res += tl.sum(o_c * w_c[:, :, None], 1)
                    den += tl.sum(w_c, 1)
                res = res / tl.where(den > 0, den, 1.0)[:, None]
                tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=io_mask)


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
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        page = tl.load(block_tables_ptr + sq * stride_bt + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
        addr = page * stride_cb + (offs_n % PAGE) * stride_cs + kvh * stride_ch
        kv_mask = nmask[:, None] & dmask[None, :]
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
