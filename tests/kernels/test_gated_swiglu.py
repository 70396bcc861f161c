"""SwiGLU over a fused gate|up row against the torch reference (CPU: interpreter; GPU: bf16 real shape)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmray.kernels.gated_swiglu import gated_swiglu, gated_swiglu_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_gated_swiglu_matches_the_reference_fp32():
    x = torch.randn(1, 5, 2 * 1100, generator=torch.Generator().manual_seed(0)).to(DEVICE)  # 2 column blocks
    out = gated_swiglu(x)
    assert out.shape == (1, 5, 1100) and out.is_contiguous()
    torch.testing.assert_close(out, gated_swiglu_ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        gated_swiglu(x[..., :-1])


@pytest.mark.gpu
def test_gated_swiglu_bf16_qwen3_shape_gpu():
    x = torch.randn(256, 2 * 3072, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(gated_swiglu(x).float(), gated_swiglu_ref(x).float(), rtol=2**-7, atol=1e-2)
