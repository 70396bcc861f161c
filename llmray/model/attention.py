"""The attention seam between the model and whoever owns the KV cache.

The model computes q/k/v (after q/k norm and rotary embedding) and hands them to an
``AttentionBackend``. Without one, attention is causal SDPA over the given tokens (training). The
reference ``generate`` passes a ``ContiguousKVCache``; the engine passes its paged-KV metadata.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@runtime_checkable
class AttentionBackend(Protocol):
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, T, H, D), k/v (B, T, Hkv, D) for the new tokens -> out (B, T, H, D).
        k = v = None: the backend's norm_rope_store stored them."""
        ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA with GQA. q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    # enable_gqa: K/V heads shared by their query groups inside SDPA (no repeat_interleave copies; H200,
    # 8 x 2048, 16/8 heads: fwd+bwd 1.25 ms vs 1.48 ms per layer with the copies)
    gqa = q.shape[2] != k.shape[2]
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


class ContiguousKVCache:
    """A plain (B, max_len, Hkv, D) cache per layer: the reference path for generation.

    New tokens are appended at ``self.length``; every sequence in the batch has the same length.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # tokens already cached (advanced by ``advance`` after each forward)
        self.max_len = max_len

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[1]
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        self.k[layer_idx][:, start:end] = k
        self.v[layer_idx][:, start:end] = v
        keys, values = self.k[layer_idx][:, :end], self.v[layer_idx][:, :end]
        groups = q.shape[2] // k.shape[2]
        qt = q.transpose(1, 2)  # (B, H, t, D)
        kt = keys.transpose(1, 2).repeat_interleave(groups, dim=1)  # (B, H, end, D)
        vt = values.transpose(1, 2).repeat_interleave(groups, dim=1)
        # query i (absolute position start+i) sees keys 0..start+i
        mask = torch.ones(t, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=q.shape[-1] ** -0.5)
        return out.transpose(1, 2)

    def advance(self, t: int) -> None:
        self.length += t
