"""Paged decode/prefill attention kernels against the torch reference.

CPU: Triton interpreter, fp32, small shapes. GPU (``-m gpu``): Qwen3-0.6B head shapes, fp32 with IEEE dots
(tolerance ~1e-4: only summation order differs) and bf16 (tolerance 2e-2: P is rounded to bf16 before P@V,
as in flash attention).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmray.kernels.paged_attention import (  # noqa: E402
    default_num_splits,
    paged_attention_ref,
    paged_decode,
    paged_prefill,
)
from llmray.kernels.paged_prefill import SPLIT_CONFIGS, SplitConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(ctx_lens, q_lens, h, hkv, d, page, dtype, seed=0):
    """A shuffled page pool holding each sequence's context; queries are the last q_len tokens."""
    g = torch.Generator().manual_seed(seed)
    nblocks_per = [-(-c // page) for c in ctx_lens]
    num_blocks = sum(nblocks_per) + 3
    perm = torch.randperm(num_blocks, generator=g)
    width = max(nblocks_per)
    tables = torch.zeros(len(ctx_lens), width, dtype=torch.int32)
    i = 0
    for s, nb in enumerate(nblocks_per):
        tables[s, :nb] = perm[i : i + nb].to(torch.int32)
        i += nb
    k_cache = torch.randn(num_blocks, page, hkv, d, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, page, hkv, d, generator=g).to(DEVICE, dtype)
    q = torch.randn(sum(q_lens), h, d, generator=g).to(DEVICE, dtype)
    starts = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    return q, k_cache, v_cache, tables.to(DEVICE), starts.to(DEVICE), ctx.to(DEVICE)


def _decode_check(ctx_lens, h, hkv, d, page, dtype, splits, atol, precision=None, config=None):
    q, kc, vc, bt, qs, cl = make_case(ctx_lens, [1] * len(ctx_lens), h, hkv, d, page, dtype)
    scale = d**-0.5
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), bt, qs, cl, scale)
    out = paged_decode(q, kc, vc, bt, cl, scale, num_splits=splits, precision=precision, config=config)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)


def _prefill_check(ctx_lens, q_lens, h, hkv, d, page, dtype, atol, precision=None):
    q, kc, vc, bt, qs, cl = make_case(ctx_lens, q_lens, h, hkv, d, page, dtype, seed=1)
    scale = d**-0.5
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), bt, qs, cl, scale)
    out = paged_prefill(q, kc, vc, bt, qs, cl, max(q_lens), scale, precision=precision)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_matches_reference_fp32(splits):
    # odd context lengths: 1 token, within a page, across pages; GQA group 2; head_dim 16
    _decode_check([1, 7, 37], h=4, hkv=2, d=16, page=4, dtype=torch.float32, splits=splits, atol=1e-5)


def test_decode_prefetch_variant_matches_reference():
    # the register double-buffered loop: tiles of 8 tokens over contexts of 1, 7, 37 (a partial last tile),
    # split-K 3 (an empty split for the 1-token context; the unsplit store is the default kernel's tests')
    cfg = (8 if DEVICE == "cpu" else 32, 4, 1, True)
    _decode_check([1, 7, 37], h=4, hkv=2, d=16, page=4, dtype=torch.float32, splits=3, atol=1e-5, config=cfg)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_decode_heads_fast_grid_matches_reference(kv_heads):
    # grid (Hkv, B, splits) with 5 stages (the H200 candidates): the same function as the default grid;
    # kv_heads 2: a program reads both KV heads' rows of a token as one row (GQA group 2 -> 4 query rows);
    # kv_heads 1 with fast_addr (page and slot from the tile's row, 32-bit offsets)
    cfg = (8 if DEVICE == "cpu" else 32, 4, 5, False, True, False, kv_heads, 0, False, kv_heads == 1)
    _decode_check([1, 7, 37], h=4, hkv=2, d=16, page=4, dtype=torch.float32, splits=3, atol=1e-5, config=cfg)


@pytest.mark.parametrize("trans_g,kv_heads", [(2, 1), (8, 2)])
def test_decode_transposed_dots_match_reference(trans_g, kv_heads):
    # S^T = K q^T, O^T = V^T P^T with the group padded to trans_g columns; group 3 (padded to 4 or 8), split-K;
    # kv_heads 2: both KV heads' rows of a token as one 2 x D row, the 6 query rows block-diagonal in q^T;
    # there with fast_addr (page and slot from the tile's row, 32-bit offsets)
    cfg = (8 if DEVICE == "cpu" else 32, 4, 5, False, True, False, kv_heads, trans_g, False, kv_heads == 2)
    _decode_check([1, 7, 37], h=6, hkv=2, d=16, page=4, dtype=torch.float32, splits=3, atol=1e-5, config=cfg)


def test_decode_mha_and_short_context_with_many_splits():
    # more splits than the context has tiles: empty splits must merge away (lse = -inf)
    _decode_check([2, 5], h=2, hkv=2, d=16, page=8, dtype=torch.float32, splits=4, atol=1e-5)


def test_prefill_matches_reference_fp32_with_cached_prefix():
    # seq 0: fresh prompt; seq 1: 13 new tokens after a 20-token cached prefix; seq 2: one token
    _prefill_check([9, 33, 6], [9, 13, 1], h=4, hkv=2, d=16, page=4, dtype=torch.float32, atol=1e-5)


def test_default_num_splits():
    assert default_num_splits(1, 8) == 32
    assert default_num_splits(32, 8) == 2
    assert default_num_splits(256, 8) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("splits", [1, 8])
def test_decode_real_shapes_gpu(dtype, atol, splits):
    ctx = [1, 17, 100, 1023, 4097]
    precision = "ieee" if dtype == torch.float32 else None  # the launcher's default; explicit for fp32
    _decode_check(
        ctx, h=16, hkv=8, d=128, page=16, dtype=dtype, splits=splits, atol=atol, precision=precision
    )


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 8])
def test_decode_fast_addr_real_shapes_gpu(splits):
    """bf16 decode with page/slot from the tile's row and 32-bit offsets (the bf16 candidate config)."""
    cfg = (64, 2, 5, False, True, False, 1, 0, False, True)
    _decode_check([1, 17, 100, 1023, 4097], 16, 8, 128, 16, torch.bfloat16, splits, atol=2e-2, config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "splits,config",
    [
        (8, SplitConfig(rows=0)),
        (8, None),
        (8, SplitConfig()),
        (12, SplitConfig(keys=64, bf16_parts=True, merge_c=1, preload=True)),
        (8, SplitConfig(sep_merge=True, merge_online=True, pdl=True)),
        (8, SplitConfig(rows=64, keys=64, warps=8, bf16_parts=True, pdl=True)),
        (8, SPLIT_CONFIGS["wide"]),  # (16 splits from the config)
        (
            8,
            SplitConfig(rows=128, keys=64, warps=8, bf16_parts=True, pdl=True, sep_merge=True, merge_rows=32),
        ),
    ],
)
@pytest.mark.parametrize("fp8", [False, True])
def test_split_prefill_after_long_prefix_real_shapes_gpu(splits, config, fp8):
    """The prefix-hit step: 48 new tokens after 2,000 cached and 100 after 30 (split-K over each tile's keys):
    per-head programs + a merge kernel (rows 0) and the split kernel, its last split merging or a merge kernel
    (run twice: the tickets are back at 0 after a launch), bf16 queries over a bf16 or an e4m3 cache."""
    ctx, qlen = [2048, 130], [48, 100]
    q, kc, vc, bt, qs, cl = make_case(ctx, qlen, 16, 8, 128, 16, torch.float32, seed=5)
    ks = vs = None
    if fp8:
        ks, vs = torch.tensor([0.02], device=DEVICE), torch.tensor([0.03], device=DEVICE)
        kc, vc = (kc / ks).to(torch.float8_e4m3fn), (vc / vs).to(torch.float8_e4m3fn)
        ref = paged_attention_ref(q, kc.float() * ks, vc.float() * vs, bt, qs, cl, 128**-0.5)
    else:
        kc, vc = kc.bfloat16(), vc.bfloat16()
        ref = paged_attention_ref(q.bfloat16().float(), kc.float(), vc.float(), bt, qs, cl, 128**-0.5)
    tile_seq = torch.tensor([0, 1, 1, -1], dtype=torch.int32, device=DEVICE)  # 64-row tiles
    tile_m = torch.tensor([0, 0, 1, 0], dtype=torch.int32, device=DEVICE)
    for _ in range(2):
        out = torch.full_like(q, float("nan"), dtype=torch.bfloat16)
        paged_prefill(
            q.bfloat16(), kc, vc, bt, qs, cl, 0, 128**-0.5, out=out, tiles=(tile_seq, tile_m), k_scale=ks,
            v_scale=vs, num_splits=splits, config=config,
        )  # fmt: skip
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_prefill_real_shapes_gpu(dtype, atol):
    _prefill_check(
        [123, 1024, 600, 4097], [123, 512, 7, 97], h=16, hkv=8, d=128, page=16, dtype=dtype, atol=atol
    )


def _fp8_case(ctx_lens, q_lens, seed):
    q, kc, vc, bt, qs, cl = make_case(ctx_lens, q_lens, 4, 2, 16, 4, torch.float32, seed=seed)
    ks, vs = torch.tensor([0.02], device=DEVICE), torch.tensor([0.01], device=DEVICE)
    kc8 = (kc / ks).to(torch.float8_e4m3fn)
    vc8 = (vc / vs).to(torch.float8_e4m3fn)
    return q, kc8, vc8, bt, qs, cl, ks, vs


def test_fp8_cache_decode_and_prefill_match_the_reference():
    """Kernels reading an e4m3 cache (scaled) equal the reference over the dequantised cache."""
    q, kc8, vc8, bt, qs, cl, ks, vs = _fp8_case([1, 7, 37], [1, 1, 1], seed=2)
    ref = paged_attention_ref(q, kc8.float() * ks, vc8.float() * vs, bt, qs, cl, 0.25)
    torch.testing.assert_close(paged_attention_ref(q, kc8, vc8, bt, qs, cl, 0.25, ks, vs), ref)
    out = paged_decode(q, kc8, vc8, bt, cl, 0.25, num_splits=2, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    cfg = (8 if DEVICE == "cpu" else 32, 2, 5, False, True, True, 1, 8, True)  # transposed, V by PTX on GPU
    out = paged_decode(q, kc8, vc8, bt, cl, 0.25, num_splits=1, k_scale=ks, v_scale=vs, config=cfg)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    q, kc8, vc8, bt, qs, cl, ks, vs = _fp8_case([9, 33], [9, 13], seed=3)
    ref = paged_attention_ref(q, kc8.float() * ks, vc8.float() * vs, bt, qs, cl, 0.25)
    out = paged_prefill(q, kc8, vc8, bt, qs, cl, 13, 0.25, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    tiles = (
        torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
        torch.zeros(2, dtype=torch.int32, device=DEVICE),
    )
    out = paged_prefill(q, kc8, vc8, bt, qs, cl, 0, 0.25, tiles=tiles, k_scale=ks, v_scale=vs, num_splits=3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)  # (split-K: "narrow", several sequences)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    [
        None,
        (64, 2, 3, False, True, True, 1, 8, True, True),
        (128, 4, 3, False, True, True, 1, 2, True),
        (32, 2, 9, False, True, True, 2, 8, True, True),
    ],
)
@pytest.mark.parametrize("splits", [1, 8])
def test_decode_fp8_real_shapes_gpu(config, splits):
    """bf16 queries over an e4m3 cache (scales not 1): the default launch and transposed-dot configs with V
    converted by inline PTX (group padded to 8 and to 2 columns)."""
    q, kc, vc, bt, qs, cl = make_case([1, 17, 100, 1023, 4097], [1] * 5, 16, 8, 128, 16, torch.float32)
    ks, vs = torch.tensor([0.02], device=DEVICE), torch.tensor([0.03], device=DEVICE)
    kc8, vc8 = (kc / ks).to(torch.float8_e4m3fn), (vc / vs).to(torch.float8_e4m3fn)
    ref = paged_attention_ref(q, kc8.float() * ks, vc8.float() * vs, bt, qs, cl, 128**-0.5)
    out = paged_decode(
        q.bfloat16(), kc8, vc8, bt, cl, 128**-0.5, num_splits=splits, k_scale=ks, v_scale=vs, config=config
    )
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize(
    "prefill_splits,config",
    [(1, None), (3, None), (3, SplitConfig(rows=0)), (2, SplitConfig(keys=2)), (2, SPLIT_CONFIGS["wide"]),
     (3, SplitConfig(32, 16, 4, 2, preload=True, merge_c=1)),
     (3, SplitConfig(16, 16, 4, 2, merge_online=True, sep_merge=True))],
)  # fmt: skip
def test_indirect_decode_and_tiled_prefill_over_a_mixed_batch(prefill_splits, config):
    """The CUDA-graph form: decode over every sequence slot (only 1-token chunks run, at their packed
    token), prefill over a padded work list of (sequence, query block) tiles (split-K over each tile's keys:
    seq 3's 13 queries after a 20-token prefix; seq 1's second tile has keys for one split only). Split-K
    launches: the split kernel ("narrow" by default: 16 rows per program, its last split merging; "wide": 128
    rows, 16 splits, a merge kernel; peeled first step, online merge) and per-head programs + a merge kernel
    (rows 0, or a key step of 2 within 4-token pages: the launcher's fallback)."""
    ctx, qlen = [5, 40, 1, 33, 1], [1, 36, 1, 13, 0]  # the last sequence is padding (no tokens)
    q, kc, vc, bt, qs, cl = make_case(ctx, [max(n, 0) for n in qlen], 4, 2, 16, 4, torch.float32, seed=4)
    ref = paged_attention_ref(q, kc, vc, bt[:4], qs[:5], cl[:4], 0.25)
    out = torch.zeros_like(q)
    paged_decode(q, kc, vc, bt, cl, 0.25, num_splits=2, out=out, query_start=qs)
    # 32-row tiles (fp32): seq 1 has 36 queries -> tiles 0 and 1; seq 3 one tile; then padding tiles
    tile_seq = torch.tensor([1, 1, 3, -1, -1], dtype=torch.int32, device=DEVICE)
    tile_m = torch.tensor([0, 1, 0, 0, 0], dtype=torch.int32, device=DEVICE)
    paged_prefill(
        q,
        kc,
        vc,
        bt,
        qs,
        cl,
        0,
        0.25,
        out=out,
        tiles=(tile_seq, tile_m),
        num_splits=prefill_splits,
        config=config,
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["narrow", "wide", "preload"])
def test_split_prefill_pdl_waits_for_the_kernel_writing_q_gpu(name):
    """A PDL launch right after a kernel that writes its queries (as the engine's rope kernel does): the
    programs read the page table and cached K/V early, but q only after griddepcontrol.wait. One shared q
    buffer over 8 "layers": a read before the wait would see the previous layer's queries."""
    q, kc, vc, bt, qs, cl = make_case([2048], [48], 16, 8, 128, 16, torch.float32, seed=6)
    kc, vc = kc.bfloat16(), vc.bfloat16()
    tiles = (
        torch.tensor([0, -1, -1], dtype=torch.int32, device=DEVICE),
        torch.zeros(3, dtype=torch.int32, device=DEVICE),
    )
    qsrc = [torch.randn_like(q).bfloat16() for _ in range(8)]
    qbuf, outs = torch.empty_like(qsrc[0]), [torch.full_like(qsrc[0], float("nan")) for _ in range(8)]
    cfg = SPLIT_CONFIGS.get(name, SplitConfig(preload=True, pdl=True))
    for i in range(8):
        qbuf.copy_(qsrc[i] * 2.0)  # (an elementwise kernel just before the launch)
        paged_prefill(
            qbuf, kc, vc, bt, qs, cl, 0, 128**-0.5, out=outs[i], tiles=tiles, num_splits=8, config=cfg
        )
    for i in range(8):
        ref = paged_attention_ref((qsrc[i] * 2.0).float(), kc.float(), vc.float(), bt, qs, cl, 128**-0.5)
        torch.testing.assert_close(outs[i].float(), ref, atol=2e-2, rtol=0)
