"""Split-K prefill attention in one launch, with a short load chain: the prefix hit's kernel.

A prefix hit's step (48 new tokens after 2,000 cached) has one 64-token tile per head: the keys are split over
NUM_SPLITS programs per (KV head, BLOCK_R rows of (token, GQA head) pairs), so each K/V tile is read once for
the GQA group, and the last split of a group to finish (an atomic ticket, reset to 0 by that program) merges
the partial outputs. What makes a program's latency short (most of the cost at this size):
- the grid covers only the tiles and row blocks the step's shape can fill (a one-sequence step of N <= 64
  tokens: one tile, not the CUDA graph's padded list; the launcher relies on active tiles coming first);
  a tile's entry and sequence 0's bounds are loaded at once (a split step is usually one sequence);
- PDL: launched while the kernel before it drains; the tile list, the page table and the first K/V step
  (keys cached before this step) are read before ``griddepcontrol.wait``, everything written after it;
- PRELOAD: the first key step is peeled, so its loads go out right after the bounds are known.
Launcher: ``paged_prefill.paged_prefill`` (``SplitConfig``); reference: ``paged_attention.paged_attention_ref``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmray.kernels._paged_attention_kernels import _kv_rows


@triton.jit
def _stamp(times_ptr, slot: tl.constexpr, TIMES: tl.constexpr):
    """(bench instrumentation, TIMES only) the global timer at ``slot`` of this program's record."""
    if TIMES:
        lin = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(
            0
        )
        tl.store(times_ptr + lin * 8 + slot, tl.extra.cuda.globaltimer())
        if slot == 0:
            tl.store(times_ptr + lin * 8 + 7, tl.extra.cuda.smid().to(tl.int64))


@triton.jit
def _row_ptrs(ptr, tok, head, d, stride_t, stride_h):
    """Pointers (BLOCK_R, BLOCK_D) to the (token, head) rows of a (N, H, D) q or out."""
    return ptr + tok[:, None] * stride_t + head[:, None] * stride_h + d[None, :]


@triton.jit
def _kv_step(
    q, k, v, m, l_sum, acc, offs_n, nmask, q_pos, qk_scale, PRECISION: tl.constexpr, CDT: tl.constexpr
):
    """One online-softmax step over BLOCK_N keys: (m, l, acc) updated."""
    s = tl.dot(q, tl.trans(k.to(CDT)), input_precision=PRECISION) * qk_scale  # (BLOCK_R, BLOCK_N)
    s = tl.where(nmask[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    l_sum = l_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(CDT), v.to(CDT), input_precision=PRECISION)
    return m_new, l_sum, acc


@triton.jit
def _tile_bounds(
    tile_seq_ptr, tile_m_ptr, query_start_ptr, context_lens_ptr, k_scale_ptr, tile, rb, qk_scale,
    NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    """A (tile, row block)'s sequence, bounds and split width (keys per split)."""
    # one load level: the tile's entry and sequence 0's bounds (a split step is usually one sequence), all
    # consumed before the one early exit (the compiler would sink loads used only after a branch below it)
    # (volatile: ptxas keeps their order, so all go out before the predicate on ``sq`` stalls the warp)
    sq = tl.load(tile_seq_ptr + tile, volatile=True)
    mblk = tl.load(tile_m_ptr + tile, volatile=True)
    q_start = tl.load(query_start_ptr, volatile=True)
    q_end = tl.load(query_start_ptr + 1, volatile=True)
    ctx = tl.load(context_lens_ptr, volatile=True)
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr, volatile=True)
    other = sq > 0  # (sequence 1, 2, ...: its bounds after its id, predicated loads)
    q_start = tl.where(other, tl.load(query_start_ptr + sq, mask=other, other=0, volatile=True), q_start)
    q_end = tl.where(other, tl.load(query_start_ptr + sq + 1, mask=other, other=0, volatile=True), q_end)
    ctx = tl.where(other, tl.load(context_lens_ptr + sq, mask=other, other=0, volatile=True), ctx)
    q_len = q_end - q_start
    first = mblk * BLOCK_M + (rb * BLOCK_R) // GROUP
    prefix = ctx - q_len  # tokens cached before this chunk
    # keys past the tile's last query are masked for every row: the same split width for every row block of
    # the tile (a merge kernel may block the rows differently)
    end = prefix + tl.minimum(q_len, (mblk + 1) * BLOCK_M)
    per_split = tl.cdiv(tl.cdiv(end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    return sq, mblk, q_start, q_len, first, prefix, end, per_split, qk_scale


@triton.jit
def _prefill_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_ptr,
    context_lens_ptr,
    tile_seq_ptr,  # tile i = queries [tile_m[i] * BLOCK_M, +BLOCK_M) of sequence tile_seq[i] (-1: none)
    tile_m_ptr,
    k_scale_ptr,
    v_scale_ptr,
    out_ptr,
    part_out_ptr,  # (N, H, S, D) fp32 or bf16 partial outputs, (N, H, S) their log2-sum-exp
    part_lse_ptr,
    ticket_ptr,  # (num_tiles * grid1,) int32 zeros: arrivals per (tile, KV head, row block)
    times_ptr,  # TIMES: (programs, 8) int64 stamps
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
    HKV: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query tokens per tile (the work list's unit)
    BLOCK_R: tl.constexpr,  # query rows (token, head) per program
    BLOCK_N: tl.constexpr,  # keys per loop step (a multiple of PAGE)
    BLOCK_S: tl.constexpr,  # next power of two >= NUM_SPLITS
    MERGE_C: tl.constexpr,  # splits per load wave of the merge (a power of two <= BLOCK_S)
    MERGE_ONLINE: tl.constexpr,  # the waves rescaled as they come (no lse pass before them)
    SEP_MERGE: tl.constexpr,  # partials only: ``_split_merge_kernel`` (PDL) merges them
    TRIGGER: tl.constexpr,  # SEP_MERGE with PDL
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,
    CDT: tl.constexpr,
    I64: tl.constexpr,
    PDL: tl.constexpr,
    PRELOAD: tl.constexpr,
    TIMES: tl.constexpr,
):
    _stamp(times_ptr, 0, TIMES)
    split = tl.program_id(0)
    kvh = tl.program_id(1) % HKV
    rb = tl.program_id(1) // HKV  # (grid dim 1 = HKV x the row blocks a tile of this step can fill)
    tile = tl.program_id(2)
    if TRIGGER:  # (SEP_MERGE) the merge kernel may launch now (it waits for this grid's writes itself)
        tl.extra.cuda.gdc_launch_dependents()
    sq, mblk, q_start, q_len, first, prefix, end, per_split, qk_scale = _tile_bounds(
        tile_seq_ptr, tile_m_ptr, query_start_ptr, context_lens_ptr, k_scale_ptr, tile, rb, qk_scale,
        NUM_SPLITS, GROUP, BLOCK_M, BLOCK_R, BLOCK_N, FP8,
    )  # fmt: skip
    start = split * per_split
    if (sq < 0) | (first >= q_len) | (start >= end):
        return  # (an empty split is not counted in ``used``)
    _stamp(times_ptr, 1, TIMES)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # row in the tile: token r // GROUP, head r % GROUP
    head = kvh * GROUP + r % GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    group_id = tile * tl.num_programs(1) + tl.program_id(1)
    tok = mblk * BLOCK_M + r // GROUP  # token index in the sequence's chunk
    rmask = (r < BLOCK_M * GROUP) & (tok < q_len)
    _split_body(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, v_scale_ptr, out_ptr, part_out_ptr,
        part_lse_ptr, ticket_ptr, times_ptr, qk_scale, sq, q_start, q_len, tok, rmask, head, d,
        dmask, prefix, start, end, per_split, split, group_id, kvh,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs, stride_ch,
        H, NUM_SPLITS, D, BLOCK_D, PAGE, BLOCK_R, BLOCK_N, BLOCK_S, MERGE_C, MERGE_ONLINE, PRECISION, FP8, CDT, I64,
        PDL, PRELOAD, TIMES, SEP_MERGE,
    )  # fmt: skip


@triton.jit
def _split_body(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, v_scale_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    ticket_ptr, times_ptr, qk_scale, sq, q_start, q_len, tok, rmask, head, d, dmask, prefix, start, end,
    per_split, split, group_id, kvh,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs, stride_ch,
    H: tl.constexpr, NUM_SPLITS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_C: tl.constexpr,
    MERGE_ONLINE: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr, CDT: tl.constexpr,
    I64: tl.constexpr, PDL: tl.constexpr, PRELOAD: tl.constexpr, TIMES: tl.constexpr, SEP_MERGE: tl.constexpr,
):  # fmt: skip
    """One (tile, KV head, row block, split): its keys [start, stop), partials, ticket, maybe the merge."""
    stop = tl.minimum(end, start + per_split)
    used = tl.cdiv(end, per_split)
    q_pos = prefix + tok
    io_mask = rmask[:, None] & dmask[None, :]
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    table = block_tables_ptr + sq * stride_bt
    loop_start = start
    if PRELOAD:  # the first step's page entries and K/V go out before anything else
        offs_n, nmask, addr, kv_mask = _kv_rows(
            table, start, stop, kvh, dmask, stride_cb, stride_cs, stride_ch, PAGE, BLOCK_N, True, I64
        )
        if PDL:  # keys cached before this step: not written by the kernel this one overlaps
            early = start + BLOCK_N <= prefix
            k = tl.load(k_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask & early, other=0.0)
            v = tl.load(v_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask & early, other=0.0)
            tl.extra.cuda.gdc_wait()
            if not early:
                k = tl.load(k_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(v_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
        _stamp(times_ptr, 2, TIMES)
        q_ptrs = _row_ptrs(q_ptr, q_start + tok, head, d, stride_qt, stride_qh)
        q = tl.load(q_ptrs, mask=io_mask, other=0.0).to(CDT)  # (BLOCK_R, BLOCK_D)
        m, l_sum, acc = _kv_step(q, k, v, m, l_sum, acc, offs_n, nmask, q_pos, qk_scale, PRECISION, CDT)
        loop_start = start + BLOCK_N
    else:
        if PDL:
            tl.extra.cuda.gdc_wait()
        _stamp(times_ptr, 2, TIMES)
        q_ptrs = _row_ptrs(q_ptr, q_start + tok, head, d, stride_qt, stride_qh)
        q = tl.load(q_ptrs, mask=io_mask, other=0.0).to(CDT)  # (BLOCK_R, BLOCK_D)
    for n0 in range(loop_start, stop, BLOCK_N):
        offs_n, nmask, addr, kv_mask = _kv_rows(
            table, n0, stop, kvh, dmask, stride_cb, stride_cs, stride_ch, PAGE, BLOCK_N, True, I64
        )
        k = tl.load(k_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
        m, l_sum, acc = _kv_step(q, k, v, m, l_sum, acc, offs_n, nmask, q_pos, qk_scale, PRECISION, CDT)
        if TIMES:
            if n0 == loop_start:  # (the timer read waits for the first loop step's row maxima)
                dep = tl.sum(tl.where(m > 0.0, 1, 0), 0)
                lin = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0)
                now = tl.inline_asm_elementwise(
                    "mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=tl.int64, is_pure=False, pack=1
                )
                tl.store(times_ptr + (lin + tl.program_id(0)) * 8 + 6, now)
    if FP8:
        acc = acc * tl.load(v_scale_ptr)
    # a row whose keys in this split are all in its future has l = 0: weight 0 in the merge
    nonempty = l_sum > 0
    own = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_sum, 1.0)[:, None], 0.0)
    lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l_sum, 1.0)), float("-inf"))
    rows = ((q_start + tok).to(tl.int64) * H + head) * NUM_SPLITS  # (BLOCK_R,) split 0's row
    own_p = own.to(part_out_ptr.dtype.element_ty)  # (fp32, or bf16: half the merge's bytes)
    tl.store(part_out_ptr + (rows + split)[:, None] * D + d[None, :], own_p, mask=io_mask)
    tl.store(part_lse_ptr + rows + split, lse, mask=rmask)
    _stamp(times_ptr, 3, TIMES)
    if not SEP_MERGE:
        tl.debug_barrier()  # every thread's partials are written before the ticket releases them
        ticket = tl.atomic_add(ticket_ptr + group_id, 1, sem="acq_rel", scope="gpu")
        _stamp(times_ptr, 4, TIMES)
        if ticket == used - 1:  # the last of the group's splits: merge them all
            tl.store(ticket_ptr + group_id, 0)  # (the others are done with it: ready for the next launch)
            o_ptrs = _row_ptrs(out_ptr, q_start + tok, head, d, stride_ot, stride_oh)
            _merge(part_out_ptr, part_lse_ptr, o_ptrs, rows, rmask, used, d, dmask, io_mask,
                   D, BLOCK_R, BLOCK_D, BLOCK_S, MERGE_C, MERGE_ONLINE)  # fmt: skip
            _stamp(times_ptr, 5, TIMES)


@triton.jit
def _merge(
    part_out_ptr, part_lse_ptr, o_ptrs, rows, rmask, used, d, dmask, io_mask, D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_C: tl.constexpr,
    MERGE_ONLINE: tl.constexpr,
):  # fmt: skip
    """The rows' ``used`` partial outputs, weighted by their log2-sum-exp, stored at ``o_ptrs``."""
    res = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_R], tl.float32)
    if MERGE_ONLINE:  # the waves' loads depend on nothing: all can go out at once (rescaled as they come)
        mx = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for c0 in tl.static_range(0, BLOCK_S, MERGE_C):
            lse_c, o_c = _merge_wave(part_lse_ptr, part_out_ptr, rows, rmask, used, d, dmask, c0, D, MERGE_C)
            m_new = tl.maximum(mx, tl.max(lse_c, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(mx - m_safe)
            w_c = tl.exp2(lse_c - m_safe[:, None])  # 0 for splits without keys
            res = res * alpha[:, None] + tl.sum(o_c * w_c[:, :, None], 1)
            den = den * alpha + tl.sum(w_c, 1)
            mx = m_new
    else:
        sp = tl.arange(0, BLOCK_S)
        lse_all = tl.load(
            part_lse_ptr + rows[:, None] + sp[None, :],
            mask=rmask[:, None] & (sp < used)[None, :],
            other=float("-inf"),
            cache_modifier=".cg",
        )  # (BLOCK_R, BLOCK_S)
        mx = tl.max(lse_all, 1)
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # (rows out of range)
        for c0 in tl.static_range(0, BLOCK_S, MERGE_C):
            lse_c, o_c = _merge_wave(part_lse_ptr, part_out_ptr, rows, rmask, used, d, dmask, c0, D, MERGE_C)
            w_c = tl.exp2(lse_c - mx[:, None])  # 0 for splits without keys
            res += tl.sum(o_c * w_c[:, :, None], 1)
            den += tl.sum(w_c, 1)
    res = res / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(o_ptrs, res.to(o_ptrs.dtype.element_ty), mask=io_mask)


@triton.jit
def _split_merge_kernel(
    tile_seq_ptr, tile_m_ptr, query_start_ptr, context_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    stride_ot, stride_oh,
    H: tl.constexpr, HKV: tl.constexpr, NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr, MERGE_C: tl.constexpr, MERGE_ONLINE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """(SEP_MERGE) grid (HKV x row blocks, tiles): launched (PDL) while ``_prefill_split_kernel`` runs; its
    bounds are read early, the partials after ``griddepcontrol.wait``."""
    kvh = tl.program_id(0) % HKV
    rb = tl.program_id(0) // HKV
    sq, mblk, q_start, q_len, first, prefix, end, per_split, _ = _tile_bounds(
        tile_seq_ptr, tile_m_ptr, query_start_ptr, context_lens_ptr, query_start_ptr, tl.program_id(1), rb,
        1.0, NUM_SPLITS, GROUP, BLOCK_M, BLOCK_R, BLOCK_N, False,
    )  # fmt: skip
    if (sq < 0) | (first >= q_len):
        return
    used = tl.cdiv(end, per_split)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    head = kvh * GROUP + r % GROUP
    tok = mblk * BLOCK_M + r // GROUP
    rmask = (r < BLOCK_M * GROUP) & (tok < q_len)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    io_mask = rmask[:, None] & dmask[None, :]
    rows = ((q_start + tok).to(tl.int64) * H + head) * NUM_SPLITS
    o_ptrs = _row_ptrs(out_ptr, q_start + tok, head, d, stride_ot, stride_oh)
    if PDL:
        tl.extra.cuda.gdc_wait()
    _merge(part_out_ptr, part_lse_ptr, o_ptrs, rows, rmask, used, d, dmask, io_mask,
           D, BLOCK_R, BLOCK_D, BLOCK_S, MERGE_C, MERGE_ONLINE)  # fmt: skip


@triton.jit
def _merge_wave(
    part_lse_ptr, part_out_ptr, rows, rmask, used, d, dmask, c0, D: tl.constexpr, MERGE_C: tl.constexpr
):
    """Splits [c0, c0 + MERGE_C) of the block's rows: their lse (BLOCK_R, MERGE_C) and partial outputs
    (BLOCK_R, MERGE_C, BLOCK_D) fp32 (-inf / 0 past ``used``)."""
    spc = c0 + tl.arange(0, MERGE_C)
    cmask = rmask[:, None] & (spc < used)[None, :]
    lse_c = tl.load(
        part_lse_ptr + rows[:, None] + spc[None, :], mask=cmask, other=float("-inf"), cache_modifier=".cg"
    )
    o_c = tl.load(
        part_out_ptr + (rows[:, None] + spc[None, :])[:, :, None] * D + d[None, None, :],
        mask=cmask[:, :, None] & dmask[None, None, :],
        other=0.0,
        cache_modifier=".cg",
    ).to(tl.float32)
    return lse_c, o_c
