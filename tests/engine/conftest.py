"""Engine test fixtures. Without CUDA, Triton kernels run in the interpreter (set before triton is imported)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def model():
    """The tiny model with seed-0 weights, torch ops, eval mode (one per test module)."""
    from llmray.config import ModelConfig
    from llmray.model.qwen3 import Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="torch").eval()
