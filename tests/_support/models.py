"""Models for GPU tests (CUDA only)."""

from __future__ import annotations

import torch

from llmray.config import ModelConfig


def gpu_test_model(dtype: torch.dtype):
    """Qwen3-0.6B attention shapes (16 q heads, 8 kv heads, head_dim 128) with 4 layers and a small vocab,
    weights scaled up so logits are peaked and greedy decoding has no near-ties."""
    from llmray.model.qwen3 import Qwen3ForCausalLM

    cfg = ModelConfig.preset(
        "qwen3-0.6b",
        num_hidden_layers=4,
        vocab_size=4096,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg)
    for p in model.parameters():
        p.data.mul_(4.0)
    return model.to(dtype).eval()
