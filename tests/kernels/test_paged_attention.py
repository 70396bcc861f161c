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


def _decode_check(ctx_lens, h, hkv, d, page, dtype, splits, atol, precision=None):
    q, kc, vc, bt, qs, cl = make_case(ctx_lens, [1] * len(ctx_lens), h, hkv, d, page, dtype)
    scale = d**-0.5
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), bt, qs, cl, scale)
    out = paged_decode(q, kc, vc, bt, cl, scale, num_splits=splits, precision=precision)
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
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_prefill_real_shapes_gpu(dtype, atol):
    _prefill_check(
        [123, 1024, 600, 4097], [123, 512, 7, 97], h=16, hkv=8, d=128, page=16, dtype=dtype, atol=atol
    )
