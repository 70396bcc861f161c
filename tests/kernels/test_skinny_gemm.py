"""The weight-streaming GEMM for a few rows equals x @ w.T (interpreter on CPU, real shapes on a GPU)."""

from __future__ import annotations

import pytest
import torch

from llmray.kernels.skinny_gemm import skinny_fits, skinny_linear


def _check(m, n, k, config, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)  # poisoned: every element written
    y = skinny_linear(x, w, config, out=out)
    ref = x.double() @ w.double().T
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), (m, n, k, config, err)


@pytest.mark.parametrize("config", [(16, 32, 1, 2, 4), (32, 32, 2, 2, 4)])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_skinny_linear_interpreter(m, config):
    from triton.runtime.interpreter import InterpretedFunction

    from llmray.kernels.skinny_gemm import _skinny_kernel

    if torch.cuda.is_available() or not isinstance(_skinny_kernel, InterpretedFunction):
        pytest.skip("CPU check under TRITON_INTERPRET=1 (tests/kernels/conftest.py)")
    _check(m, 64, 128, config, torch.float32, "cpu")


def test_skinny_fits():
    x, w = torch.zeros(48, 1024), torch.zeros(4096, 1024)
    assert skinny_fits(x, w) and not skinny_fits(torch.zeros(65, 1024), w)
    assert not skinny_fits(x, torch.zeros(4096, 1000))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)])
@pytest.mark.parametrize("config", [(16, 128, 1, 4, 4), (32, 128, 4, 4, 4)])
def test_skinny_linear_gpu(n, k, config):
    for m in (1, 48, 64):
        _check(m, n, k, config, torch.bfloat16, "cuda")
