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
import os

import torch
import torch.nn.functional as F
import triton

from llmray.kernels._paged_attention_kernels import (
    _decode_kernel,
    _merge_kernel,
    cache_scales,
    scale_and_strides,
    shape_meta,
)
from llmray.kernels._paged_prefill_kernels import _prefill_kernel, _prefill_merge_kernel
from llmray.kernels.kv_store import from_cache
from llmray.kernels.paged_prefill import paged_prefill, prefill_block_m

__all__ = [
    "decode_config",
    "default_num_splits",
    "paged_attention_ref",
    "paged_decode",
    "paged_prefill",
    "prefill_block_m",
]
__all__ += [
    "_decode_kernel",
    "_merge_kernel",
    "_prefill_kernel",
    "_prefill_merge_kernel",
]

# decode kernel launch configuration by query dtype:
# (BLOCK_N, num_warps, num_stages[, prefetch[, heads_fast[, v_scale_first[, kv_heads[, trans_g[, v_asm[,
# fast_addr]]]]]]]); kv_heads 2: a program reads two adjacent KV heads' rows of each token as one row;
# trans_g > 0: S^T = K q^T and O^T = V^T P^T (tokens on the mma's M side, the GQA group padded to trans_g
# columns instead of 16 rows: half the mma instructions and an 8x smaller softmax); v_asm (fp8, GPU): V
# converted by inline PTX (kept in registers without the v_scale multiply; the scale goes on the output);
# fast_addr: page and slot from the tile's row number (BLOCK_N a multiple of the page) and 32-bit cache
# offsets when the cache has < 2^31 elements (sm_90 SASS: bf16 776 -> 539 instructions per tile and warp).
# bench/attn_gather.py (round 5): reading the fp8 cache through the page tables with no math at all reaches
# 2.9-3.4 TB/s (bf16 3.7), so the fp8 kernel (2.9 TB/s) is near what this gather allows.
# From the H200 sweep (bench/decode_sweep.py, batch 256 at the nano-vllm workload's contexts, window A
# 2026-11-30): 5 stages give the K/V tiles two buffers behind the page-table stage (2-4 stages: one, so a
# program's loads never overlap its math); heads_fast runs a sequence's KV heads side by side (their rows
# share each token's 2 KB). bf16 0.228 ms (3.86 TB/s) vs 0.239 with (64, 4, 3); an fp8 cache (64, 2, 5)
# 0.216 ms vs 0.244 with (64, 4, 2); batch 1 x 800 (64, 4, 5) 0.034 ms vs 0.036. Batches of at most
# SMALL_BATCH sequences (split-K over the context) use DECODE_CONFIG_SMALL.
DECODE_CONFIG = {
    torch.float32: (32, 4, 2),
    # fast_addr (page/slot from the tile row, 32-bit offsets): 0.2213 ms vs 0.2225 (round 5, decode_sweep_e.json);
    # before: (64, 2, 5) 0.2215 ms (3.98 TB/s) vs (64, 4, 5) 0.2279 (round 3)
    torch.bfloat16: (64, 2, 5, False, True, False, 1, 0, False, True),
    torch.float16: (64, 4, 5),
}
# fp8: transposed dots (group padded to 8 columns) and V converted by inline PTX: 0.157 ms (2.80 TB/s) vs 0.186
# for (64, 2, 5) with v_scale_first only (fifth session W1, bench/results/decode_sweep_d.json; sm_90 SASS:
# ~19 instructions per token and warp vs ~31). Before: v_scale_first (V converted and scaled in registers:
# 16-bit transposing ldmatrix instead of one shared load per byte): 0.188 ms vs 0.205 (decode_sweep_c.json).
DECODE_CONFIG_FP8 = (64, 2, 5, False, True, True, 1, 8, True, True)  # + fast_addr: 0.1525 ms (round 5)
DECODE_CONFIG_FP8_SMALL = (64, 4, 5, False, True, True)  # batch 1 x 800: 0.0386 ms vs transposed 0.050
DECODE_CONFIG_SMALL = (64, 4, 5)
SMALL_BATCH = 16
# split-K multiplier over ``default_num_splits`` by cache kind (False: model dtype, True: fp8)
DECODE_SPLIT_MULT = {False: 1, True: 2}  # fp8 at batch 256: 2 splits 0.1862 ms vs 1 0.1878 (round 3)


def decode_config(dtype: torch.dtype, fp8: bool, num_seqs: int) -> tuple:
    """The launch configuration ``paged_decode`` uses for this query dtype, cache kind and batch."""
    if fp8:
        return DECODE_CONFIG_FP8_SMALL if num_seqs <= SMALL_BATCH else DECODE_CONFIG_FP8
    if num_seqs <= SMALL_BATCH and dtype != torch.float32:
        return DECODE_CONFIG_SMALL
    return DECODE_CONFIG.get(dtype, (64, 4, 2))


def default_num_splits(
    num_seqs: int, num_kv_heads: int, num_sms: int = 132, max_splits: int = 32, fp8: bool = False
) -> int:
    """Enough split-K programs for about four per SM when the batch alone has fewer; a batch that fills the
    SMs alone takes DECODE_SPLIT_MULT[fp8] splits (shorter programs: less tail in the last wave)."""
    splits = max(1, min(max_splits, (4 * num_sms) // max(1, num_seqs * num_kv_heads)))
    return splits if splits > 1 else DECODE_SPLIT_MULT[fp8]


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
    config: tuple | None = None,  # see DECODE_CONFIG
) -> torch.Tensor:
    """Decode attention of one query per sequence over its paged context (Triton).

    With ``query_start``, q holds packed tokens and sequence b's query is token query_start[b]; sequences
    whose chunk is not exactly one token are skipped (a CUDA graph can launch over every sequence slot)."""
    bsz = block_tables.shape[0]
    _, h, d = q.shape
    hkv = k_cache.shape[2]
    group = h // hkv
    out = torch.empty_like(q) if out is None else out
    if bsz == 0:
        return out
    fp8, ks, vs = cache_scales(k_cache, k_scale, v_scale, context_lens)
    indirect = query_start is not None
    if num_splits > 1:
        part_out = torch.empty(bsz, h, num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(bsz, h, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    block_d = triton.next_power_of_2(d)
    block_n, warps, stages, *rest = config or decode_config(q.dtype, fp8, bsz)
    prefetch = bool(rest and rest[0])
    heads_fast = len(rest) > 1 and bool(rest[1])
    v_scale_first = len(rest) > 2 and bool(rest[2])
    kv_heads = int(rest[3]) if len(rest) > 3 else 1
    trans_g = int(rest[4]) if len(rest) > 4 else 0  # > 0: transposed dots with BLOCK_G >= trans_g
    # inline PTX: not under the CPU interpreter
    v_asm = len(rest) > 5 and bool(rest[5]) and fp8 and q.dtype != torch.float32  # (fp16 V: for 16-bit q)
    v_asm = v_asm and q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
    fast_addr = len(rest) > 6 and bool(rest[6])
    # 32-bit cache offsets when every element of both caches is within reach (fast_addr configs only)
    i64 = not fast_addr or max(c.shape[0] * c.stride(0) for c in (k_cache, v_cache)) >= 2**31
    if kv_heads > 1 and (hkv % kv_heads or block_d != d or k_cache.stride(2) != d or k_cache.stride(3) != 1):
        kv_heads = 1  # (head rows not adjacent and dense: one head per program)
    grid_h = hkv // kv_heads
    block_g = max(trans_g or 16, triton.next_power_of_2(group * kv_heads))
    _decode_kernel[(grid_h, bsz, num_splits) if heads_fast else (bsz, grid_h, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, query_start if indirect else context_lens, ks, vs, out,
        part_out, part_lse, *scale_and_strides(q, out, block_tables, k_cache, scale),
        **shape_meta(q, k_cache, precision, fp8), BLOCK_G=block_g, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        INDIRECT=indirect, PREFETCH=prefetch, HEADS_FAST=heads_fast, V_SCALE_FIRST=v_scale_first, KV_HEADS=kv_heads, TRANS=trans_g > 0, V_ASM=v_asm, FAST_ADDR=fast_addr,
        I64=i64, num_warps=warps, num_stages=stages,
    )  # fmt: skip
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
