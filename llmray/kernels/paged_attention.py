"""Paged attention over a block-table KV cache: Triton decode and prefill kernels + torch reference.

Cache layout per layer: (num_blocks, block_size, Hkv, D). K/V are read through the block tables inside the
kernels (page = block_tables[seq, pos // block_size]); nothing is gathered into contiguous tensors.

- Decode (one query token per sequence): one program per (sequence, KV head, split). The query heads that
  share a KV head (GQA group) are packed into one tile, so each K/V tile is loaded once for the group.
  Long contexts are split over ``num_splits`` programs (split-K); a second kernel merges the partial
  outputs with their log-sum-exp. Sources: vLLM's paged attention v2 and its Triton decode kernel.
- Prefill (a chunk of query tokens per sequence, after a possibly cached prefix): flash-attention style
  tiles of queries against all keys at positions <= the query's (causal), prefix included.
Softmax runs in fp32 with exp2; ``precision="ieee"`` keeps fp32 dots exact on the GPU (TF32 otherwise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmray.kernels.kv_store import from_cache, is_fp8

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_ptr,  # INDIRECT: sequence b's query token is query_start[b] (skipped unless its q_len is 1)
    k_scale_ptr,  # FP8: (1,) fp32 scales of the cache
    v_scale_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
    H: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
    INDIRECT: tl.constexpr,
    FP8: tl.constexpr,
    CDT: tl.constexpr,  # dot input dtype (fp16 for an fp8 cache under bf16: e4m3 -> f16 is one instruction)
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    tok = b
    if INDIRECT:
        tok = tl.load(query_start_ptr + b)
        if tl.load(query_start_ptr + b + 1) - tok != 1:
            return  # a prefill chunk (the prefill kernel's) or a padding sequence
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
    ).to(CDT)  # (BLOCK_G, BLOCK_D)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < end
        page = tl.load(block_tables_ptr + b * stride_bt + offs // PAGE, mask=nmask, other=0).to(tl.int64)
        addr = page * stride_cb + (offs % PAGE) * stride_cs + kvh * stride_ch  # (BLOCK_N,)
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k.to(CDT)), input_precision=PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0).to(CDT)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
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
        lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l_sum, 1.0)), float("-inf"))  # base 2
        row = (b * H + heads) * NUM_SPLITS + split  # part_out (B, H, S, D), part_lse (B, H, S)
        tl.store(part_out_ptr + row[:, None] * D + d[None, :], out, mask=omask)
        tl.store(part_lse_ptr + row, lse, mask=gmask)


@triton.jit
def _merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    query_start_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INDIRECT: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    tok = b
    if INDIRECT:
        tok = tl.load(query_start_ptr + b)
        if tl.load(query_start_ptr + b + 1) - tok != 1:
            return
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < NUM_SPLITS
    row = (b * H + h) * NUM_SPLITS + s
    lse = tl.load(part_lse_ptr + row, mask=smask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # split 0 is never empty, so the max is finite
    w = tl.where(smask, w, 0.0)
    o = tl.load(
        part_out_ptr + row[:, None] * D + d[None, :], mask=smask[:, None] & (d[None, :] < D), other=0.0
    )
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(out_ptr + tok * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


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
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
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
    if TILED:
        sq = tl.load(tile_seq_ptr + tl.program_id(0))
        mblk = tl.load(tile_m_ptr + tl.program_id(0))
        h = tl.program_id(1)
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
    for n0 in range(0, end, BLOCK_N):
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
    out = acc / l_sum[:, None]
    tl.store(
        out_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mmask[:, None] & dmask[None, :],
    )


def _precision(dtype: torch.dtype, precision: str | None) -> str:
    if precision is not None:
        return precision
    return "ieee" if dtype == torch.float32 else "tf32"


def _compute_dtype(dtype: torch.dtype, fp8: bool):
    """Dot inputs: the query's dtype, but fp16 for an fp8 cache under bf16 (a native e4m3 conversion)."""
    if fp8 and dtype == torch.bfloat16:
        return tl.float16
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def default_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int = 132, max_splits: int = 32) -> int:
    """Enough split-K programs for about four per SM when the batch alone has fewer."""
    return max(1, min(max_splits, (4 * num_sms) // max(1, num_seqs * num_kv_heads)))


def paged_decode(
    q: torch.Tensor,  # (B, H, D): one query token per sequence
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    context_lens: torch.Tensor,  # (B,) int32, >= 1 (the new token included)
    scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,  # (B, H, D), or (N, H, D) with query_start
    precision: str | None = None,
    query_start: torch.Tensor | None = None,  # (B + 1,): q/out rows are packed tokens; only q_len 1 runs
    k_scale: torch.Tensor | None = None,  # (1,) fp32, for an fp8 cache
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one query per sequence over its paged context (Triton).

    With ``query_start``, q holds packed tokens and sequence b's query is token query_start[b]; sequences
    whose chunk is not exactly one token are skipped (a CUDA graph can launch over every sequence slot)."""
    bsz = block_tables.shape[0]
    _, h, d = q.shape
    _, page, hkv, _ = k_cache.shape
    group = h // hkv
    out = torch.empty_like(q) if out is None else out
    if bsz == 0:
        return out
    fp8 = is_fp8(k_cache)
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("an fp8 KV cache needs k_scale and v_scale")
    indirect = query_start is not None
    if num_splits > 1:
        part_out = torch.empty(bsz, h, num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(bsz, h, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    block_d = triton.next_power_of_2(d)
    block_n = 32 if q.dtype == torch.float32 else 64
    _decode_kernel[(bsz, hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        query_start if indirect else context_lens,
        k_scale if fp8 else context_lens,
        v_scale if fp8 else context_lens,
        out,
        part_out,
        part_lse,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        H=h,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        D=d,
        BLOCK_D=block_d,
        PAGE=page,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        PRECISION=_precision(q.dtype, precision),
        INDIRECT=indirect,
        FP8=fp8,
        CDT=_compute_dtype(q.dtype, fp8),
        num_warps=4,
        num_stages=2,
    )
    if num_splits > 1:
        _merge_kernel[(bsz, h)](
            part_out,
            part_lse,
            query_start if indirect else part_lse,
            out,
            out.stride(0),
            out.stride(1),
            H=h,
            D=d,
            BLOCK_D=block_d,
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            INDIRECT=indirect,
        )
    return out


def paged_prefill(
    q: torch.Tensor,  # (N, H, D): the query tokens of all prefill sequences, packed
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D); already holds these tokens' K/V
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    query_start: torch.Tensor,  # (B + 1,) int32: sequence i's queries are q[query_start[i]:query_start[i+1]]
    context_lens: torch.Tensor,  # (B,) int32: cached prefix + this chunk
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,  # (N, H, D)
    precision: str | None = None,
    tiles: tuple[torch.Tensor, torch.Tensor] | None = None,  # (tile_seq, tile_m) int32 (T,), see below
    k_scale: torch.Tensor | None = None,  # (1,) fp32, for an fp8 cache
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix plus themselves (Triton).

    ``tiles``: the work list (one program per tile and head): tile i covers queries [tile_m[i] * BLOCK_M,
    +BLOCK_M) of sequence tile_seq[i] (-1: nothing), with BLOCK_M = ``prefill_block_m(q.dtype)``. The grid
    then does not depend on the batch (CUDA graphs) and has no idle (sequence, block) programs."""
    _, h, d = q.shape
    _, page, hkv, _ = k_cache.shape
    out = torch.empty_like(q) if out is None else out
    nseq = block_tables.shape[0]
    if nseq == 0 or (max_query_len == 0 and tiles is None):
        return out
    fp8 = is_fp8(k_cache)
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("an fp8 KV cache needs k_scale and v_scale")
    block_m = prefill_block_m(q.dtype)
    block_n = block_m
    if tiles is not None:
        grid = (tiles[0].shape[0], h)
        tile_seq, tile_m = tiles
    else:
        grid = (nseq, triton.cdiv(max_query_len, block_m), h)
        tile_seq = tile_m = query_start
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start,
        context_lens,
        tile_seq,
        tile_m,
        k_scale if fp8 else query_start,
        v_scale if fp8 else query_start,
        out,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        GROUP=h // hkv,
        D=d,
        BLOCK_D=triton.next_power_of_2(d),
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION=_precision(q.dtype, precision),
        TILED=tiles is not None,
        FP8=fp8,
        CDT=_compute_dtype(q.dtype, fp8),
        num_warps=4,
        num_stages=2,
    )
    return out


def prefill_block_m(dtype: torch.dtype) -> int:
    """Query rows per prefill program (the unit of ``tiles``)."""
    return 32 if dtype == torch.float32 else 64


def paged_attention_ref(
    q: torch.Tensor,  # (N, H, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, max_blocks)
    query_start: torch.Tensor,  # (B + 1,)
    context_lens: torch.Tensor,  # (B,)
    scale: float,
    k_scale: torch.Tensor | None = None,  # (1,) fp32, for an fp8 cache
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference (and CPU path) for both kernels: per sequence, gather its pages and run causal SDPA."""
    _, h, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    starts, ctxs = query_start.tolist(), context_lens.tolist()
    for i, ctx in enumerate(ctxs):
        s, e = starts[i], starts[i + 1]
        pages = block_tables[i, : math.ceil(ctx / page)].long()
        keys = k_cache[pages].reshape(-1, hkv, d)[:ctx]  # (ctx, Hkv, D)
        vals = v_cache[pages].reshape(-1, hkv, d)[:ctx]
        qi = q[s:e].transpose(0, 1)  # (H, t, D)
        keys, vals = from_cache(keys, q.dtype, k_scale), from_cache(vals, q.dtype, v_scale)
        kt = keys.transpose(0, 1).repeat_interleave(h // hkv, dim=0)  # (H, ctx, D)
        vt = vals.transpose(0, 1).repeat_interleave(h // hkv, dim=0)
        t = e - s
        mask = torch.ones(t, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - t)
        out[s:e] = F.scaled_dot_product_attention(qi, kt, vt, attn_mask=mask, scale=scale).transpose(0, 1)
    return out
