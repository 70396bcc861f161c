"""Fused q/k RMSNorm + RoPE kernel against the torch composition (rms_norm_ref on q and k, then rope_ref)."""

from __future__ import annotations

import pytest
import torch

from llmray.kernels.kv_store import kv_store
from llmray.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref, qk_norm_rope_store
from llmray.model.qwen3 import rope_tables


def _check(b, t, h, hkv, d, dtype, device, assert_matches):
    cos, sin = rope_tables(d, 4096, 1e6)
    cos, sin = cos.to(device), sin.to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    # q/k as strided views of one fused q|k|v projection row (the engine's fused QKV GEMM)
    row = (torch.randn(b, t, (h + 2 * hkv) * d, generator=g) * 3).to(device, dtype)
    q = row[..., : h * d].view(b, t, h, d)
    k = row[..., h * d : (h + hkv) * d].view(b, t, hkv, d)
    qw = (1 + 0.3 * torch.randn(d, generator=g)).to(device, dtype)
    kw = (1 + 0.3 * torch.randn(d, generator=g)).to(device, dtype)
    pos = torch.randint(0, 4096, (b, t), generator=g).to(device)
    qo, ko = qk_norm_rope(q, k, qw, kw, 1e-6, pos, cos, sin)
    assert qo.is_contiguous() and ko.is_contiguous()
    eq, ek = qk_norm_rope_ref(q.float(), k.float(), qw.float(), kw.float(), 1e-6, pos, cos, sin)
    if dtype != torch.float32:  # the reference rounds the normed values to the dtype before rotating
        eq, ek = qk_norm_rope_ref(q, k, qw, kw, 1e-6, pos, cos, sin)
    assert_matches(qo, eq, dtype, "q")
    assert_matches(ko, ek, dtype, "k")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_matches_reference_on_fused_row_views(dtype, device, assert_matches):
    # 5 tokens of 2 sequences... packed as the engine does (B=1) and a batch of 2; 3 query heads (not a power of 2)
    _check(1, 5, 3, 1, 16, dtype, device, assert_matches)
    _check(2, 2, 4, 2, 32, dtype, device, assert_matches)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 7, 4097])
def test_qk_norm_rope_real_shapes_gpu(t, assert_matches):
    _check(1, t, 16, 8, 128, torch.bfloat16, "cuda", assert_matches)


def test_qk_norm_rope_rejects_bad_shapes(device):
    q = torch.zeros(1, 2, 4, 12, device=device)
    cos = torch.zeros(8, 6, device=device)
    with pytest.raises(ValueError, match="power-of-2"):
        qk_norm_rope(q, q, torch.ones(12, device=device), torch.ones(12, device=device), 1e-6,
                     torch.zeros(1, 2, dtype=torch.long, device=device), cos, cos)  # fmt: skip


def _check_store(n, h, hkv, d, cache_dtype, device):
    """The fused store equals qk_norm_rope followed by kv_store, bit for bit (both cache dtypes)."""
    cos, sin = rope_tables(d, 4096, 1e6)
    cos, sin = cos.to(device), sin.to(device)
    g = torch.Generator(device="cpu").manual_seed(n)
    row = (torch.randn(n, (h + 2 * hkv) * d, generator=g) * 3).to(device, torch.bfloat16)
    q, k, v = row.split([h * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(n, h, d), k.view(n, hkv, d), v.view(n, hkv, d)
    qw = (1 + 0.3 * torch.randn(d, generator=g)).to(device, torch.bfloat16)
    kw = (1 + 0.3 * torch.randn(d, generator=g)).to(device, torch.bfloat16)
    pos = torch.randint(0, 4096, (n,), generator=g).to(device)
    blocks, page = 6, 4
    slots = torch.randperm(blocks * page, generator=g)[:n].to(device)
    slots[1] = -1  # a padding token: nothing stored
    scale = torch.tensor([0.05], device=device) if cache_dtype == torch.float8_e4m3fn else None
    poison = torch.full((blocks, page, hkv, d), 7.0, device=device).to(cache_dtype)
    kc, vc, ekc, evc = poison.clone(), poison.clone(), poison.clone(), poison.clone()
    qo = qk_norm_rope_store(q, k, v, qw, kw, 1e-6, pos, cos, sin, kc, vc, slots, scale, scale)
    eq, ek = qk_norm_rope(q[None], k[None], qw, kw, 1e-6, pos[None], cos, sin)
    kv_store(ek[0], v, ekc, evc, slots, scale, scale)  # (the interpreter's fp8 rounding is its own)
    assert torch.equal(qo, eq[0])
    assert torch.equal(kc.float(), ekc.float()) and torch.equal(vc.float(), evc.float())
    assert (kc.float() != 7.0).any() and (vc.float() != 7.0).any()


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_qk_norm_rope_store_equals_the_two_launches(cache_dtype, device):
    _check_store(5, 3, 1, 16, cache_dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_qk_norm_rope_store_real_shapes_gpu(cache_dtype):
    _check_store(20, 16, 8, 128, cache_dtype, "cuda")
