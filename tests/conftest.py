"""Shared fixtures: the tiny model, a saved tiny model directory, shared data, one local Ray per module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton decides at kernel-definition time whether to interpret: set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmray.config import ModelConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shared_data(relative: str) -> Path:
    """Path of a file under the shared data folder (``$LLMRAY_SHARED_DATA`` or ``<repo>/../shared/data``).

    Skips the calling test with a clear reason where the data is absent.
    """
    root = Path(os.environ.get("LLMRAY_SHARED_DATA", REPO.parent / "shared" / "data"))
    path = root / relative
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (set LLMRAY_SHARED_DATA to the folder holding it)")
    return path


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.preset("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    from llmray.model.qwen3 import Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(tiny_config, kernels="torch").eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny checkpoint with a byte-level BPE tokenizer trained on a small text (session-wide)."""
    from llmray.model.checkpoint import save_model
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.model.tokenizer import train_bpe

    text = (REPO / "README.md").read_text() if (REPO / "README.md").exists() else "hello world " * 200
    tok = train_bpe([text] * 4, vocab_size=400)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg, kernels="torch")
    out = tmp_path_factory.mktemp("tiny_model")
    save_model(model, out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module, with more logical CPUs than the 2-core CI machine has.

    Train workers, Ray Data and Serve replicas must request fractional CPUs, or they wait forever.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
