"""SwiGLU kernel against the torch reference: outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from llmray.kernels.swiglu import swiglu, swiglu_ref

DTYPES = [torch.float32, torch.bfloat16]
CPU_SHAPES = [(1, 64), (7, 300), (123, 200), (4097, 24)]
GPU_SHAPES = [(1, 64), (7, 1000), (123, 4096), (4097, 3000), (16384, 3072)]


def _check(rows, width, dtype, device, assert_matches):
    g = torch.Generator(device="cpu").manual_seed(0)
    gate = (3 * torch.randn(rows, width, generator=g)).to(device, dtype).requires_grad_(True)
    up = torch.randn(rows, width, generator=g).to(device, dtype).requires_grad_(True)
    dy = torch.randn(rows, width, generator=g).to(device, dtype)
    y = swiglu(gate, up)
    y.backward(dy)
    gr = gate.detach().float().requires_grad_(True)
    ur = up.detach().float().requires_grad_(True)
    swiglu_ref(gr, ur).backward(dy.float())
    assert y.dtype == dtype
    assert_matches(y, swiglu_ref(gr, ur), dtype, "y")
    assert_matches(gate.grad, gr.grad, dtype, "dgate")
    assert_matches(up.grad, ur.grad, dtype, "dup")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", CPU_SHAPES)
def test_swiglu(rows, width, dtype, device, assert_matches):
    _check(rows, width, dtype, device, assert_matches)


def test_non_contiguous_and_no_grad(device, assert_matches):
    x = torch.randn(5, 2 * 48, device=device)
    gate, up = x[:, :48], x[:, 48:]  # halves of a fused gate_up projection
    with torch.no_grad():
        assert_matches(swiglu(gate, up), swiglu_ref(gate, up), torch.float32, "halves")
    gt = torch.randn(48, 5, device=device).t()
    assert_matches(swiglu(gt, up), swiglu_ref(gt, up), torch.float32, "transposed")


def test_rejects_mismatched_inputs(device):
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(3, 4, device=device), torch.randn(3, 5, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", GPU_SHAPES)
def test_swiglu_gpu(rows, width, dtype, assert_matches):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _check(rows, width, dtype, "cuda", assert_matches)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_fused_matches_reference(dtype, device, assert_matches):
    """The fused [gate | up] layout: output and the one (..., 2I) gradient, against swiglu_ref on the halves."""
    from llmray.kernels.swiglu import swiglu_fused

    g = torch.Generator(device="cpu").manual_seed(0)
    x = (2 * torch.randn(3, 5, 2 * 1100, generator=g)).to(device, dtype).requires_grad_(True)  # 2 col blocks
    dy = torch.randn(3, 5, 1100, generator=g).to(device, dtype)
    y = swiglu_fused(x)
    y.backward(dy)
    xr = x.detach().float().requires_grad_(True)
    yr = swiglu_ref(*xr.chunk(2, dim=-1))
    yr.backward(dy.float())
    assert y.shape == (3, 5, 1100) and y.dtype == dtype
    assert_matches(y, yr, dtype, "y")
    assert_matches(x.grad, xr.grad, dtype, "d[gate|up]")
    with torch.no_grad():
        assert_matches(swiglu_fused(x), yr, dtype, "no-grad")
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu_fused(torch.randn(2, 7, device=device))
