"""Paged prefill attention launchers: per-head programs (``_paged_prefill_kernels.py``, any chunk) and split-K
over each tile's keys (``_prefill_split_kernel.py``, a short chunk after a long cached prefix). The module docs
and the torch reference: ``paged_attention.py``, which re-exports ``paged_prefill`` and ``prefill_block_m``."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton

from llmray.kernels._paged_attention_kernels import cache_scales, scale_and_strides, shape_meta
from llmray.kernels._paged_prefill_kernels import _prefill_kernel, _prefill_merge_kernel
from llmray.kernels._prefill_split_kernel import _prefill_split_kernel, _split_merge_kernel


class SplitConfig(NamedTuple):
    """A split-K launch: ``_prefill_split_kernel`` (``_prefill_split_kernel.py``), or with ``rows`` 0 per-head
    programs + a merge kernel (``_paged_prefill_kernels.py``: also the fallback when ``keys`` is not a multiple
    of the page or the ticket counters run out)."""

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
    config: SplitConfig | None = None,  # the split-K launch (default: PREFILL_SPLIT_CONFIG / _ONE_SEQ)
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix plus themselves (Triton).

    ``tiles``: the work list (one program per tile and head): tile i covers queries [tile_m[i] * BLOCK_M,
    +BLOCK_M) of sequence tile_seq[i] (-1: nothing), with BLOCK_M = ``prefill_block_m(q.dtype)``. The grid
    then does not depend on the batch (CUDA graphs) and has no idle (sequence, block) programs.
    ``num_splits`` > 1 (tiled only): each tile's keys are split over that many programs whose partial
    outputs are merged (a 48-token chunk after a 2,000-token prefix is one tile per head), by default
    (``PREFILL_SPLIT_CONFIG``, ``_ONE_SEQ`` for one sequence) through ``_prefill_split_kernel.py``, whose
    grid covers only the first cdiv(N, BLOCK_M) + B - 1 tiles: the active tiles must come first in the list."""
    out = torch.empty_like(q) if out is None else out
    nseq = block_tables.shape[0]
    if nseq == 0 or (max_query_len == 0 and tiles is None):
        return out
    if tiles is None or num_splits <= 1:
        return _prefill_heads(q, k_cache, v_cache, block_tables, query_start, context_lens, max_query_len,
                              scale, out, precision, tiles, k_scale, v_scale, 1)  # fmt: skip
    cfg = config or (PREFILL_SPLIT_ONE_SEQ if nseq == 1 else PREFILL_SPLIT_CONFIG)
    return prefill_split(
        q, k_cache, v_cache, block_tables, query_start, context_lens, scale, out, precision, tiles, k_scale,
        v_scale, num_splits, cfg,
    )  # fmt: skip


def _prefill_heads(
    q, k_cache, v_cache, block_tables, query_start, context_lens, max_query_len, scale, out, precision, tiles,
    k_scale, v_scale, splits: int,
) -> torch.Tensor:  # fmt: skip
    """Per-head programs (``_prefill_kernel``): grid (sequence, query block, head), or (tile, head, split) with
    ``tiles``; split-K partials merged by ``_prefill_merge_kernel``."""
    _, h, d = q.shape
    block_m = prefill_block_m(q.dtype)
    if tiles is not None:
        grid: tuple[int, ...] = (tiles[0].shape[0], h, splits)
        tile_seq, tile_m = tiles
    else:
        grid = (block_tables.shape[0], triton.cdiv(max_query_len, block_m), h)
        tile_seq = tile_m = query_start
    fp8, ks, vs = cache_scales(k_cache, k_scale, v_scale, query_start)
    part_out = part_lse = out  # (unused without splits)
    if splits > 1:
        part_out = torch.empty(q.shape[0], h, splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(q.shape[0], h, splits, dtype=torch.float32, device=q.device)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start, context_lens, tile_seq, tile_m, ks, vs, out, part_out,
        part_lse, *scale_and_strides(q, out, block_tables, k_cache, scale),
        **shape_meta(q, k_cache, precision, fp8),
        NUM_SPLITS=splits, BLOCK_M=block_m, BLOCK_N=block_m, TILED=tiles is not None, num_warps=4, num_stages=2,
    )  # fmt: skip
    if splits > 1:
        block_s = triton.next_power_of_2(splits)
        rows = max(1, min(block_m, 64 // block_s))  # S x R x D fp32 partials per program: 64 rows' worth
        _prefill_merge_kernel[(tile_seq.shape[0], h, block_m // rows)](
            part_out, part_lse, query_start, context_lens, tile_seq, tile_m, out, out.stride(0), out.stride(1),
            H=h, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=block_m, BLOCK_N=block_m, NUM_SPLITS=splits,
            BLOCK_S=block_s, R=rows, num_warps=4,
        )  # fmt: skip
    return out


# split-K prefill with ``tiles`` (a short chunk after a long cached prefix). H200, 48 new tokens over 2,048, 28
# layers in a CUDA graph (bench/attn_prefix.py): per-head programs + a merge kernel 0.784 ms; the sixth session's
# one-launch GQA kernel 0.480 (attn_prefix_w1/w2.json; removed in the eighth: no default used it); seventh, W1
# (attn_prefix_w1b.json): SplitConfig() 0.450 (a grid without the padding tiles, one metadata load level), +PDL
# 0.443, +bf16 partials 0.416; W3 (attn_prefix.json): wide 0.379, narrow 0.423
SPLIT_CONFIGS = {
    "narrow": SplitConfig(bf16_parts=True, pdl=True),  # (W2, attn_prefix_w2b.json: 0.423 vs 0.481)
    # 128 rows (a tile's whole GQA group) per program: each K/V tile read once from L2; 16 splits of two 64-key
    # steps; the merge in a second kernel (PDL) over 16-row blocks. W2b (attn_prefix_w2c.json): 0.375 ms vs
    # narrow 0.421, sixth session 0.482; in the engine (B's W2b A/B) the hit's forward 1.44 vs 1.66 ms
    "wide": SplitConfig(
        rows=128, keys=64, warps=8, bf16_parts=True, pdl=True, sep_merge=True, merge_rows=16, splits=16
    ),
}
PREFILL_SPLIT_CONFIG: SplitConfig = SPLIT_CONFIGS["narrow"]  # split steps of several sequences
# one-sequence split steps (a request's first chunk: the prefix hit); LLMRAY_PREFILL_SPLIT (a SPLIT_CONFIGS
# name, read at import) overrides it for A/B runs of the engine
_NAME = os.environ.get("LLMRAY_PREFILL_SPLIT", "wide")
if _NAME not in SPLIT_CONFIGS:
    raise ValueError(f"LLMRAY_PREFILL_SPLIT={_NAME!r}: one of {sorted(SPLIT_CONFIGS)}")
PREFILL_SPLIT_ONE_SEQ: SplitConfig = SPLIT_CONFIGS[_NAME]


_PDL_OK: dict[torch.device, bool] = {}


def prefill_split(
    q, k_cache, v_cache, block_tables, query_start, context_lens, scale, out, precision, tiles, k_scale, v_scale,
    splits: int, cfg: SplitConfig, times: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``paged_prefill`` with split-K through ``_prefill_split_kernel``: grid (split, KV head x row block,
    tile programs); ``times`` (bench instrumentation): (programs, 8) int64 global-timer stamps."""
    _, h, d = q.shape
    _, page, hkv, _ = k_cache.shape
    block_m = prefill_block_m(q.dtype)
    splits = cfg.splits or splits
    # active tiles come first in the list: a step of N tokens over S sequence slots fills at most
    # cdiv(N, BLOCK_M) + S - 1 tiles, and rows of at most min(N, BLOCK_M) tokens per tile
    c = min(tiles[0].shape[0], triton.cdiv(q.shape[0], block_m) + block_tables.shape[0] - 1)
    if c <= 0:
        return out
    fp8, ks, vs = cache_scales(k_cache, k_scale, v_scale, query_start)
    meta = shape_meta(q, k_cache, precision, fp8)
    group, block_d = meta["GROUP"], meta["BLOCK_D"]
    rbs = triton.cdiv(min(q.shape[0], block_m) * group, cfg.rows or 1)
    grid = (splits, hkv * rbs, c)
    ticket = tickets(q.device, c * grid[1])
    if not cfg.rows or ticket is None or cfg.keys % page:  # (see SplitConfig: per-head programs + merge)
        return _prefill_heads(q, k_cache, v_cache, block_tables, query_start, context_lens, 0, scale, out,
                              precision, tiles, k_scale, v_scale, splits)  # fmt: skip
    part_dtype = torch.bfloat16 if cfg.bf16_parts and q.dtype == torch.bfloat16 else torch.float32
    part_out = torch.empty(q.shape[0], h, splits, d, dtype=part_dtype, device=q.device)
    part_lse = torch.empty(q.shape[0], h, splits, dtype=torch.float32, device=q.device)
    block_s = triton.next_power_of_2(splits)
    merge_c = cfg.merge_c or max(1, min(block_s, 64 * 32 * cfg.warps // (cfg.rows * block_d)))
    if q.is_cuda and q.device not in _PDL_OK:  # (Hopper+; a launcher without launch_pdl clears it below)
        _PDL_OK[q.device] = torch.cuda.get_device_capability(q.device)[0] >= 9
    pdl = cfg.pdl and _PDL_OK.get(q.device, False)
    args = (
        q, k_cache, v_cache, block_tables, query_start, context_lens, tiles[0], tiles[1], ks, vs, out, part_out,
        part_lse, ticket, times if times is not None else query_start,
        *scale_and_strides(q, out, block_tables, k_cache, scale),
    )  # fmt: skip
    meta.update(
        HKV=hkv, NUM_SPLITS=splits, BLOCK_M=block_m, BLOCK_R=cfg.rows, BLOCK_N=cfg.keys, BLOCK_S=block_s,
        MERGE_C=min(merge_c, block_s), MERGE_ONLINE=cfg.merge_online, PRELOAD=cfg.preload,
        TIMES=times is not None,
        I64=max(x.shape[0] * x.stride(0) for x in (k_cache, v_cache)) >= 2**31,  # (else 32-bit cache offsets)
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
