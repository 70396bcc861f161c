"""Reference generation on a contiguous KV cache: the engine's correctness baseline.

Deliberately simple (one sequence, no batching, no paging); the engine must produce the same greedy
tokens. Sampling follows the usual order: temperature, top-k, top-p.
"""

from __future__ import annotations

import torch

from llmray.model.attention import ContiguousKVCache
from llmray.model.qwen3 import Qwen3ForCausalLM


def sample_next(
    logits: torch.Tensor,  # (V,) fp32
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None,
) -> int:
    if temperature <= 0.0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.inference_mode()
def generate(
    model: Qwen3ForCausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Generate up to ``max_new_tokens`` after ``prompt_ids``; returns the new token ids (eos included).

    ``use_cache=False`` recomputes the whole sequence each step (the "no KV cache" baseline).
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    device = model.model.embed_tokens.weight.device
    total = len(prompt_ids) + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens + max_new_tokens={max_new_tokens} exceeds "
            f"max_position_embeddings={model.config.max_position_embeddings}"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cfg = model.config
    dtype = model.model.embed_tokens.weight.dtype
    cache = None
    if use_cache:
        cache = ContiguousKVCache(
            cfg.num_hidden_layers, 1, total, cfg.num_key_value_heads, cfg.head_dim, dtype, device
        )
    tokens = list(prompt_ids)
    new: list[int] = []
    step_ids = tokens
    for _ in range(max_new_tokens):
        if cache is None:
            ids = torch.tensor([tokens], device=device)
            logits = model(ids)[0, -1]
        else:
            ids = torch.tensor([step_ids], device=device)
            pos = torch.arange(cache.length, cache.length + len(step_ids), device=device).unsqueeze(0)
            logits = model(ids, positions=pos, attn_metadata=cache)[0, -1]
            cache.advance(len(step_ids))
        nxt = sample_next(logits.float(), temperature, top_p, top_k, generator)
        new.append(nxt)
        tokens.append(nxt)
        step_ids = [nxt]
        if eos_token_id is not None and nxt == eos_token_id:
            break
    return new
