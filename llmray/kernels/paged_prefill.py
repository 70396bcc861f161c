"""Paged prefill attention launchers (the kernels: ``_paged_prefill_kernels.py``; the module docs and the torch
reference: ``paged_attention.py``, which re-exports ``paged_prefill`` and ``prefill_block_m``)."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton

from llmray.kernels._paged_attention_kernels import LOG2E, _compute_dtype, _precision
from llmray.kernels._paged_prefill_kernels import (
    _prefill_gqa_kernel,
    _prefill_kernel,
    _prefill_merge_kernel,
    tickets,
)
from llmray.kernels._prefill_split_kernel import _prefill_split_kernel, _split_merge_kernel
from llmray.kernels.kv_store import is_fp8


class SplitConfig(NamedTuple):
    """A launch of ``_prefill_split_kernel`` (``_prefill_split_kernel.py``)."""

    rows: int = 16  # BLOCK_R: query rows = (token, GQA head) pairs per program
    keys: int = 128  # BLOCK_N: keys per step
    warps: int = 4
    stages: int = 3
    bf16_parts: bool = False  # bf16 partial outputs for bf16 queries (half the merge's bytes)
    merge_c: int = 0  # splits per merge load wave (0: as many as fit 64 fp32 registers per thread)
    pdl: bool = False  # programmatic dependent launch (Hopper+; plain launch elsewhere)
    preload: bool = False  # the first key step peeled: its loads first (before the PDL wait)
    maxnreg: int = 0  # registers per thread cap (0: the compiler's choice)
    merge_online: bool = False  # the merge's load waves rescaled as they come (no lse pass first)
    sep_merge: bool = False  # CUDA: partials only, merged by a second kernel launched with PDL (no tickets)
    merge_rows: int = 0  # sep_merge: rows per merge program (0: ``rows``)
    splits: int = 0  # split-K programs per tile (0: the caller's ``num_splits``)


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
    num_splits: int = 1,  # split-K over each tile's keys (with ``tiles``): short chunks after long prefixes
    config: tuple | None = None,  # split-K launch (PREFILL_SPLIT_CONFIG / _ONE_SEQ)
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix plus themselves (Triton).

    ``tiles``: the work list (one program per tile and head): tile i covers queries [tile_m[i] * BLOCK_M,
    +BLOCK_M) of sequence tile_seq[i] (-1: nothing), with BLOCK_M = ``prefill_block_m(q.dtype)``. The grid
    then does not depend on the batch (CUDA graphs) and has no idle (sequence, block) programs.
    ``num_splits`` > 1 (tiled only): each tile's keys are split over that many programs whose partial
    outputs are merged (a 48-token chunk after a 2,000-token prefix is one tile per head): by default in the
    same launch (``PREFILL_SPLIT_CONFIG``, ``_ONE_SEQ`` for one sequence; ``_prefill_split_kernel.py``), whose
    grid covers only the first cdiv(N, BLOCK_M) + B - 1 tiles: the active tiles must come first in the list."""
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
    grid: tuple[int, ...]
    splits = num_splits if tiles is not None else 1
    if tiles is not None:
        grid = (tiles[0].shape[0], h, splits)
        tile_seq, tile_m = tiles
    else:
        grid = (nseq, triton.cdiv(max_query_len, block_m), h)
        tile_seq = tile_m = query_start
    if config is None:
        config = PREFILL_SPLIT_ONE_SEQ if nseq == 1 else PREFILL_SPLIT_CONFIG
    cfg = config
    if splits > 1 and isinstance(cfg, SplitConfig):
        return prefill_split(
            q, k_cache, v_cache, block_tables, query_start, context_lens, scale, out, precision, tiles,
            k_scale, v_scale, splits, cfg,
        )  # fmt: skip
    if splits > 1 and cfg[0] > 0:
        return _prefill_split_fused(
            q,
            k_cache,
            v_cache,
            block_tables,
            query_start,
            context_lens,
            scale,
            out,
            precision,
            tiles,
            k_scale,
            v_scale,
            splits,
            cfg,
        )
    part_out = part_lse = out  # (unused without splits)
    if splits > 1:
        part_out = torch.empty(q.shape[0], h, splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(q.shape[0], h, splits, dtype=torch.float32, device=q.device)
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
        NUM_SPLITS=splits,
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
    if splits > 1:
        block_s = triton.next_power_of_2(splits)
        rows = max(1, min(block_m, 64 // block_s))  # S x R x D fp32 partials per program: 64 rows' worth
        _prefill_merge_kernel[(tile_seq.shape[0], h, block_m // rows)](
            part_out,
            part_lse,
            query_start,
            context_lens,
            tile_seq,
            tile_m,
            out,
            out.stride(0),
            out.stride(1),
            H=h,
            D=d,
            BLOCK_D=triton.next_power_of_2(d),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            NUM_SPLITS=splits,
            BLOCK_S=block_s,
            R=rows,
            num_warps=4,
        )
    return out


def _prefill_split_fused(
    q,
    k_cache,
    v_cache,
    block_tables,
    query_start,
    context_lens,
    scale,
    out,
    precision,
    tiles,
    k_scale,
    v_scale,
    splits,
    cfg,
) -> torch.Tensor:
    """``paged_prefill`` with split-K: one program per (tile, KV head, row block, split), GQA rows packed,
    the last split of each group merging them (``_prefill_gqa_kernel``)."""
    _, h, d = q.shape
    _, page, hkv, _ = k_cache.shape
    group = h // hkv
    block_m = prefill_block_m(q.dtype)
    block_r, block_n, warps, stages, fast_addr, *rest = cfg
    part_dtype = torch.bfloat16 if rest and rest[0] else torch.float32  # (bf16 halves the merge's bytes)
    block_s = triton.next_power_of_2(splits)
    rb = triton.cdiv(block_m * group, block_r)
    grid = (tiles[0].shape[0], hkv * rb, splits)
    ticket = tickets(q.device, grid[0] * grid[1])
    if ticket is None:  # (more groups than counters: the two-kernel path)
        return paged_prefill(
            q,
            k_cache,
            v_cache,
            block_tables,
            query_start,
            context_lens,
            0,
            scale,
            out=out,
            precision=precision,
            tiles=tiles,
            k_scale=k_scale,
            v_scale=v_scale,
            num_splits=splits,
            config=(0,),
        )
    fp8 = is_fp8(k_cache)
    i64 = not fast_addr or max(c.shape[0] * c.stride(0) for c in (k_cache, v_cache)) >= 2**31
    part_out = torch.empty(q.shape[0], h, splits, d, dtype=part_dtype, device=q.device)
    part_lse = torch.empty(q.shape[0], h, splits, dtype=torch.float32, device=q.device)
    _prefill_gqa_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start,
        context_lens,
        tiles[0],
        tiles[1],
        k_scale if fp8 else query_start,
        v_scale if fp8 else query_start,
        out,
        part_out,
        part_lse,
        ticket,
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
        NUM_SPLITS=splits,
        GROUP=group,
        D=d,
        BLOCK_D=triton.next_power_of_2(d),
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_S=block_s,
        MERGE_BCAST=len(rest) > 1 and bool(rest[1]),
        MERGE_C=max(1, min(block_s, 64 * 32 * warps // (block_r * triton.next_power_of_2(d)))),
        PRECISION=_precision(q.dtype, precision),
        FP8=fp8,
        CDT=_compute_dtype(q.dtype, fp8),
        FAST_ADDR=fast_addr,
        I64=i64,
        num_warps=warps,
        num_stages=stages,
    )
    return out


# split-K prefill with ``tiles`` (a short chunk after a long cached prefix): a SplitConfig (the one-launch
# ``_prefill_split_kernel``, its last split merging); or, sixth session, (BLOCK_R query rows = (token, GQA head)
# pairs per program, BLOCK_N keys per step, num_warps, num_stages, fast_addr[, bf16 partial outputs[, merge
# weights read back per split]]) for ``_prefill_gqa_kernel`` (padding tiles of the graph's list are programs
# too); BLOCK_R 0: per-head programs + a merge kernel. H200, 48 new tokens over 2,048, 28 layers in a CUDA graph
# (bench/attn_prefix.py): sixth session (attn_prefix_w1/w2.json, W3 attn_prefix.json) (16, 128, 4, 3, True) 0.480
# ms vs 0.784 for the two-kernel path. Seventh, W1 (attn_prefix_w1b.json): SplitConfig() 0.450 (a grid without
# the padding tiles, one metadata load level), +PDL 0.443, +bf16 partials 0.416 vs 0.479 for (16, 128, 4, 3, True)
SPLIT_CONFIGS = {
    "narrow": SplitConfig(bf16_parts=True, pdl=True),  # (W2, attn_prefix_w2b.json: 0.423 vs 0.481)
    # 128 rows (a tile's whole GQA group) per program: each K/V tile read once from L2; 16 splits of two 64-key
    # steps; the merge in a second kernel (PDL) over 16-row blocks. W2b (attn_prefix_w2c.json): 0.375 ms vs
    # narrow 0.421, sixth session 0.482; in the engine (B's W2b A/B) the hit's forward 1.44 vs 1.66 ms
    "wide": SplitConfig(
        rows=128, keys=64, warps=8, bf16_parts=True, pdl=True, sep_merge=True, merge_rows=16, splits=16
    ),
}
PREFILL_SPLIT_CONFIG: tuple = SPLIT_CONFIGS["narrow"]  # split steps of several sequences
# one-sequence split steps (a request's first chunk: the prefix hit); LLMRAY_PREFILL_SPLIT (a SPLIT_CONFIGS
# name, read at import) overrides it for A/B runs of the engine
_NAME = os.environ.get("LLMRAY_PREFILL_SPLIT", "wide")
if _NAME not in SPLIT_CONFIGS:
    raise ValueError(f"LLMRAY_PREFILL_SPLIT={_NAME!r}: one of {sorted(SPLIT_CONFIGS)}")
PREFILL_SPLIT_ONE_SEQ: tuple = SPLIT_CONFIGS[_NAME]


_PDL_OK: dict[torch.device, bool] = {}


def prefill_split(
    q, k_cache, v_cache, block_tables, query_start, context_lens, scale, out, precision, tiles, k_scale, v_scale,
    splits: int, cfg: SplitConfig, times: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``paged_prefill`` with split-K through ``_prefill_split_kernel``: grid (split, KV head x row block,
    tile programs); ``times`` (bench instrumentation): (programs, 8) int64 global-timer stamps."""
    _, h, d = q.shape
    _, page, hkv, _ = k_cache.shape
    group = h // hkv
    block_m = prefill_block_m(q.dtype)
    splits = cfg.splits or splits
    # active tiles come first in the list: a step of N tokens over S sequence slots fills at most
    # cdiv(N, BLOCK_M) + S - 1 tiles, and rows of at most min(N, BLOCK_M) tokens per tile
    c = min(tiles[0].shape[0], triton.cdiv(q.shape[0], block_m) + block_tables.shape[0] - 1)
    rbs = triton.cdiv(min(q.shape[0], block_m) * group, cfg.rows)
    if c <= 0:
        return out
    block_s = triton.next_power_of_2(splits)
    grid = (splits, hkv * rbs, c)
    ticket = tickets(q.device, c * grid[1])
    if ticket is None or cfg.keys % page:  # (more groups than counters, pages across steps: two kernels)
        return paged_prefill(
            q, k_cache, v_cache, block_tables, query_start, context_lens, 0, scale, out=out,
            precision=precision, tiles=tiles, k_scale=k_scale, v_scale=v_scale, num_splits=splits, config=(0,),
        )  # fmt: skip
    fp8 = is_fp8(k_cache)
    i64 = max(x.shape[0] * x.stride(0) for x in (k_cache, v_cache)) >= 2**31
    part_out = torch.empty(
        q.shape[0],
        h,
        splits,
        d,
        dtype=torch.bfloat16 if cfg.bf16_parts and q.dtype == torch.bfloat16 else torch.float32,
        device=q.device,
    )
    part_lse = torch.empty(q.shape[0], h, splits, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(d)
    merge_c = cfg.merge_c or max(1, min(block_s, 64 * 32 * cfg.warps // (cfg.rows * block_d)))
    if q.is_cuda and q.device not in _PDL_OK:  # (Hopper+; a launcher without launch_pdl clears it below)
        _PDL_OK[q.device] = torch.cuda.get_device_capability(q.device)[0] >= 9
    pdl = cfg.pdl and _PDL_OK.get(q.device, False)
    args = (
        q, k_cache, v_cache, block_tables, query_start, context_lens, tiles[0], tiles[1],
        k_scale if fp8 else query_start, v_scale if fp8 else query_start, out, part_out, part_lse, ticket,
        times if times is not None else query_start, scale * LOG2E, q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
    )  # fmt: skip
    meta = dict(
        H=h, HKV=hkv, NUM_SPLITS=splits, GROUP=group, D=d, BLOCK_D=block_d, PAGE=page, BLOCK_M=block_m,
        BLOCK_R=cfg.rows, BLOCK_N=cfg.keys, BLOCK_S=block_s, MERGE_C=min(merge_c, block_s),
        MERGE_ONLINE=cfg.merge_online, PRECISION=_precision(q.dtype, precision), FP8=fp8,
        CDT=_compute_dtype(q.dtype, fp8), I64=i64, PRELOAD=cfg.preload, TIMES=times is not None,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    if cfg.maxnreg:
        meta["maxnreg"] = cfg.maxnreg
    sep = cfg.sep_merge
    meta.update(SEP_MERGE=sep, TRIGGER=sep and _PDL_OK.get(q.device, False))
    if pdl:
        try:
            _prefill_split_kernel[grid](*args, **meta, PDL=True, launch_pdl=True)
        except TypeError:  # (a Triton launcher without launch_pdl: plain launches from now on)
            _PDL_OK[q.device] = pdl = False
    if not pdl:
        _prefill_split_kernel[grid](*args, **meta, PDL=False)
    if sep:
        margs = (
            tiles[0],
            tiles[1],
            query_start,
            context_lens,
            out,
            part_out,
            part_lse,
            out.stride(0),
            out.stride(1),
        )
        mrows = cfg.merge_rows or cfg.rows  # (4 warps; load waves of <= 64 fp32 registers per thread)
        mc = cfg.merge_c or max(1, min(block_s, 64 * 32 * 4 // (mrows * block_d)))
        mmeta = {k: meta[k] for k in ("H", "HKV", "NUM_SPLITS", "GROUP", "D", "BLOCK_D", "BLOCK_M")}
        mmeta.update(
            BLOCK_R=mrows, BLOCK_N=cfg.keys, BLOCK_S=block_s, MERGE_C=mc, MERGE_ONLINE=cfg.merge_online
        )
        mgrid = (hkv * triton.cdiv(min(q.shape[0], block_m) * group, mrows), grid[2])
        if meta["TRIGGER"]:
            _split_merge_kernel[mgrid](*margs, **mmeta, PDL=True, num_warps=4, launch_pdl=True)
        else:
            _split_merge_kernel[mgrid](*margs, **mmeta, PDL=False, num_warps=4)
    return out


def prefill_block_m(dtype: torch.dtype) -> int:
    """Query rows per prefill program (the unit of ``tiles``)."""
    return 32 if dtype == torch.float32 else 64
