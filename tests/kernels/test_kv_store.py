"""KV-cache store by slot mapping: Triton kernel vs index_copy_ reference (interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmray.kernels.kv_store import kv_store, kv_store_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(n, num_blocks, page, hkv, d, dtype):
    g = torch.Generator().manual_seed(n)
    k = torch.randn(n, hkv, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(n, hkv, d, generator=g).to(DEVICE, dtype)
    slots = torch.randperm(num_blocks * page, generator=g)[:n]
    slots[1::3] = -1  # padding rows are skipped
    slots = slots.to(DEVICE)
    caches = [torch.zeros(num_blocks, page, hkv, d, dtype=dtype, device=DEVICE) for _ in range(4)]
    kv_store(k, v, caches[0], caches[1], slots)
    kv_store_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].abs().sum() > 0


@pytest.mark.parametrize("n,hkv,d", [(1, 1, 16), (7, 2, 16), (20, 3, 24)])
def test_kv_store_matches_reference(n, hkv, d):
    _check(n, num_blocks=8, page=4, hkv=hkv, d=d, dtype=torch.float32)


def test_kv_store_strided_input():
    # k/v as the model produces them: views of a fused (N, Hkv*D) projection, non-contiguous over tokens
    kv = torch.randn(5, 2, 3, 16).to(DEVICE)
    k, v = kv[:, 0], kv[:, 1]
    slots = torch.tensor([3, 0, 7, -1, 12]).to(DEVICE)
    c = [torch.zeros(4, 4, 3, 16, device=DEVICE) for _ in range(4)]
    kv_store(k, v, c[0], c[1], slots)
    kv_store_ref(k, v, c[2], c[3], slots)
    assert torch.equal(c[0], c[2]) and torch.equal(c[1], c[3])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_store_real_shapes_gpu(dtype):
    _check(4097, num_blocks=600, page=16, hkv=8, d=128, dtype=dtype)
