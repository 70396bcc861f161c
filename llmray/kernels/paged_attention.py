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

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
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
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < D
    q = tl.load(
        q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )  # (BLOCK_G, BLOCK_D)

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
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    omask = gmask[:, None] & dmask[None, :]
    if NUM_SPLITS == 1:
        out = acc / l_sum[:, None]
        tl.store(
            out_ptr + b * stride_ot + heads[:, None] * stride_oh + d[None, :],
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
    out_ptr,
    stride_ot,
    stride_oh,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
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
    tl.store(out_ptr + b * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_ptr,
    context_lens_ptr,
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
):
    sq = tl.program_id(0)
    mblk = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(query_start_ptr + sq)
    q_len = tl.load(query_start_ptr + sq + 1) - q_start
    if mblk * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens_ptr + sq)
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
    )  # (BLOCK_M, BLOCK_D)
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
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(nmask[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
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
    out: torch.Tensor | None = None,  # (B, H, D)
    precision: str | None = None,
) -> torch.Tensor:
    """Decode attention of one query per sequence over its paged context (Triton)."""
    bsz, h, d = q.shape
    _, page, hkv, _ = k_cache.shape
    group = h // hkv
    out = torch.empty_like(q) if out is None else out
    if bsz == 0:
        return out
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
        num_warps=4,
        num_stages=2,
    )
    if num_splits > 1:
        _merge_kernel[(bsz, h)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            H=h,
            D=d,
            BLOCK_D=block_d,
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
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
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix plus themselves (Triton)."""
    _, h, d = q.shape
    _, page, hkv, _ = k_cache.shape
    out = torch.empty_like(q) if out is None else out
    nseq = block_tables.shape[0]
    if nseq == 0 or max_query_len == 0:
        return out
    fp32 = q.dtype == torch.float32
    block_m, block_n = (32, 32) if fp32 else (64, 64)
    _prefill_kernel[(nseq, triton.cdiv(max_query_len, block_m), h)](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start,
        context_lens,
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
        num_warps=4,
        num_stages=2,
    )
    return out


def paged_attention_ref(
    q: torch.Tensor,  # (N, H, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, max_blocks)
    query_start: torch.Tensor,  # (B + 1,)
    context_lens: torch.Tensor,  # (B,)
    scale: float,
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
        kt = keys.transpose(0, 1).repeat_interleave(h // hkv, dim=0).to(q.dtype)  # (H, ctx, D)
        vt = vals.transpose(0, 1).repeat_interleave(h // hkv, dim=0).to(q.dtype)
        t = e - s
        mask = torch.ones(t, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - t)
        out[s:e] = F.scaled_dot_product_attention(qi, kt, vt, attn_mask=mask, scale=scale).transpose(0, 1)
    return out
