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


@pytest.mark.parametrize("n,hkv,d", [(7, 2, 16), (4097, 8, 128)])
def test_kv_store_fp8_matches_reference(n, hkv, d):
    """fp8 (e4m3) cache: x / scale, clamped to ±448 (the outlier saturates instead of becoming NaN).

    Inputs are e4m3 values times power-of-two scales, so no rounding is involved (the interpreter's fp8
    conversion rounds 7.9 down to 4); real shapes with random inputs run on the GPU."""
    if n > 100 and DEVICE == "cpu":
        pytest.skip("real shapes on the GPU only")
    g = torch.Generator().manual_seed(0)
    ks, vs = torch.tensor([0.125], device=DEVICE), torch.tensor([0.0625], device=DEVICE)
    k = torch.randn(n, hkv, d, generator=g).to(DEVICE)
    v = torch.randn(n, hkv, d, generator=g).to(DEVICE)
    if DEVICE == "cpu":
        k = (k / ks).to(torch.float8_e4m3fn).float() * ks
        v = (v / vs).to(torch.float8_e4m3fn).float() * vs
    k[0, 0, 0] = 80.0  # / 0.125 = 640 > 448
    slots = torch.randperm(-(-n // 4) * 4 + 8, generator=g)[:n].to(DEVICE)
    slots[1::3] = -1
    nb = -(-n // 4) + 2
    caches = [torch.zeros(nb, 4, hkv, d, dtype=torch.float8_e4m3fn, device=DEVICE) for _ in range(4)]
    kv_store(k, v, caches[0], caches[1], slots, ks, vs)
    kv_store_ref(k, v, caches[2], caches[3], slots, ks, vs)
    tol = dict(atol=0, rtol=0) if DEVICE == "cpu" else dict(atol=2**-9, rtol=2**-3)  # GPU: fast fp32 div
    for a, b in ((caches[0], caches[2]), (caches[1], caches[3])):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert caches[0].float().abs().max() == 448.0 and not caches[0].float().isnan().any()
    back = caches[1].float().view(-1, hkv, d)[slots[slots >= 0]] * vs
    torch.testing.assert_close(back, v[slots >= 0], atol=vs.item() * 2**-6, rtol=2**-4)
