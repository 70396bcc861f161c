"""Kernel-test helpers. Turns on Triton's CPU interpreter where no GPU exists.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` kernel is defined (decoration time), i.e.
before ``llmray.kernels.<op>`` is imported; pytest imports this file before the test modules beside it.

Tolerances (one place, used by every kernel test; each test compares the kernel, run in the tested
dtype, to the torch reference evaluated in fp32 on the same (upcast) inputs):
- fp32: the kernels do the reference's fp32 math; only reduction order and the exp/rsqrt implementations
  differ (~1e-6 relative). rtol = atol = 1e-5, and 1e-4 for sums over thousands of rows (dW).
- bf16: the kernels load bf16, compute in fp32 and round once on store, so an element may be off by one
  bf16 rounding (unit roundoff 2^-8 ~= 3.9e-3): rtol = 2^-7 (two roundings' headroom), atol = 1e-2 * the
  tensor's scale for elements near zero where cancellation leaves no relative accuracy.
- GEMM-fed results (fused cross-entropy dH/dW) are compared norm-wise: max|a - e| / max|e|.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-7, 1e-2)}  # (rtol, atol relative to scale)


def _assert_matches(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, reduced: bool = False
) -> None:
    """Compare a kernel result (in ``dtype``) with the fp32 reference; see the module docstring."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.float(), expected.float()
    scale = e.abs().max().item() if e.numel() else 1.0
    rtol, atol = TOL[dtype]
    if reduced and dtype == torch.float32:
        rtol, atol = 1e-4, 1e-4
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")


def _assert_normwise(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"{what}: max error {err:.3g} > {rel} x max |expected| {scale:.3g}"


@pytest.fixture
def assert_matches():
    return _assert_matches


@pytest.fixture
def assert_normwise():
    return _assert_normwise


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
