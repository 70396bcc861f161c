"""RoPE kernel against the torch reference: q and k outputs and gradients, training and engine layouts."""

from __future__ import annotations

import pytest
import torch

from llmray.kernels.rope import rope, rope_apply, rope_ref
from llmray.model.qwen3 import rope_tables

DTYPES = [torch.float32, torch.bfloat16]
# (B, T, H, Hkv, D): token counts 1, 7, 37 on CPU (one interpreted program per token; 123 on the GPU)
CPU_SHAPES = [(1, 1, 4, 2, 16), (2, 7, 3, 1, 64), (1, 37, 4, 2, 32)]
GPU_SHAPES = [
    (1, 1, 16, 8, 128),
    (1, 7, 16, 8, 128),
    (3, 123, 14, 2, 64),
    (1, 4097, 16, 8, 128),
    (4, 4096, 16, 8, 128),
]


def _check(b, t, h, hkv, d, dtype, device, assert_matches, packed=False):
    cos, sin = rope_tables(d, 8192, 1e6)
    cos, sin = cos.to(device), sin.to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    # q/k as views of projection outputs, as the model makes them
    q = torch.randn(b, t, h * d, generator=g).to(device, dtype).view(b, t, h, d).requires_grad_(True)
    k = torch.randn(b, t, hkv * d, generator=g).to(device, dtype).view(b, t, hkv, d).requires_grad_(True)
    if packed:  # engine: arbitrary per-token positions
        positions = torch.randint(0, 8192, (b, t), generator=g).to(device)
    else:  # training: 0..T-1 broadcast over the batch (a stride-0 view)
        positions = torch.arange(t, device=device).expand(b, t)
    dq = torch.randn(q.shape, generator=g).to(device, dtype)
    dk = torch.randn(k.shape, generator=g).to(device, dtype)
    qo, ko = rope(q, k, positions, cos, sin)
    torch.autograd.backward((qo, ko), (dq, dk))
    qr = q.detach().float().requires_grad_(True)
    kr = k.detach().float().requires_grad_(True)
    qro, kro = rope_ref(qr, kr, positions, cos, sin)
    torch.autograd.backward((qro, kro), (dq.float(), dk.float()))
    assert qo.dtype == dtype and ko.dtype == dtype
    assert_matches(qo, qro, dtype, "q")
    assert_matches(ko, kro, dtype, "k")
    assert_matches(q.grad, qr.grad, dtype, "dq")
    assert_matches(k.grad, kr.grad, dtype, "dk")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["train", "engine"])
def test_rope(shape, dtype, packed, device, assert_matches):
    _check(*shape, dtype, device, assert_matches, packed=packed)


def test_inplace_and_strided_qkv(device, assert_matches):
    """In-place rotation (inference) of q/k that are slices of one fused qkv tensor."""
    cos, sin = (t.to(device) for t in rope_tables(32, 64, 1e4))
    qkv = torch.randn(2, 5, (4 + 2 + 2) * 32, device=device)
    q, k = qkv[..., :128].unflatten(-1, (4, 32)), qkv[..., 128:192].unflatten(-1, (2, 32))
    positions = torch.randint(0, 64, (2, 5), device=device)
    qr, kr = rope_ref(q, k, positions, cos, sin)
    v_before = qkv[..., 192:].clone()
    qo, ko = rope_apply(q, k, positions, cos, sin, inplace=True)
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    assert_matches(q, qr, torch.float32, "q in place")
    assert_matches(k, kr, torch.float32, "k in place")
    assert torch.equal(qkv[..., 192:], v_before)  # v untouched


def test_inverse_undoes_forward(device):
    cos, sin = (t.to(device) for t in rope_tables(16, 32, 1e4))
    q, k = torch.randn(1, 6, 2, 16, device=device), torch.randn(1, 6, 1, 16, device=device)
    pos = torch.arange(6, device=device)[None]
    q2, k2 = rope_apply(*rope_apply(q, k, pos, cos, sin), pos, cos, sin, inverse=True)
    torch.testing.assert_close(q2, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k2, k, rtol=1e-5, atol=1e-5)


def test_rejects_bad_shapes(device):
    cos, sin = rope_tables(16, 32, 1e4)
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="positions of shape"):
        rope(q, k, torch.arange(3)[None], cos, sin)
    with pytest.raises(ValueError, match="cos/sin tables"):
        rope(q, k, torch.arange(4)[None], cos[:, :4], sin[:, :4])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_rope_gpu(shape, dtype, assert_matches):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _check(*shape, dtype, "cuda", assert_matches, packed=False)
    _check(*shape, dtype, "cuda", assert_matches, packed=True)
