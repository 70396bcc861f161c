"""The engine's attention backend for one step: paged KV store + paged attention over packed tokens.

A step's tokens are packed as one row (B=1, T=N): first the decode sequences (one query token each),
then the prefill chunks. ``attend`` writes the new K/V into the cache by slot mapping and attends each
query over its sequence's cached context through the block table. On CUDA this is our Triton kernels
(``llmray.kernels.kv_store`` and ``paged_attention``); elsewhere the torch references.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmray.kernels.kv_store import kv_store, kv_store_ref
from llmray.kernels.paged_attention import paged_attention_ref, paged_decode, paged_prefill


@dataclass
class PagedAttentionMetadata:
    """Per-step inputs of the attention kernels (passed explicitly to the model: no global context)."""

    k_cache: list[torch.Tensor]  # per layer (num_blocks, block_size, Hkv, D)
    v_cache: list[torch.Tensor]
    slot_mapping: torch.Tensor  # (N,) int64: cache slot of each new token; -1 = padding, not stored
    block_tables: torch.Tensor  # (B, max_blocks) int32, decode sequences first
    query_start: torch.Tensor  # (B + 1,) int32: sequence i's tokens are [query_start[i], query_start[i+1])
    context_lens: torch.Tensor  # (B,) int32: cached tokens + this step's tokens
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    max_query_len: int  # longest prefill chunk (0 if none)
    scale: float
    num_splits: int = 1  # split-K programs per decode sequence
    use_triton: bool = True

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, N, H, D), k/v (1, N, Hkv, D) -> (1, N, H, D)."""
        q0, k0, v0 = q[0], k[0], v[0]
        kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
        if not self.use_triton:
            kv_store_ref(k0, v0, kc, vc, self.slot_mapping)
            out = paged_attention_ref(
                q0, kc, vc, self.block_tables, self.query_start, self.context_lens, self.scale
            )
            return out.unsqueeze(0)
        kv_store(k0, v0, kc, vc, self.slot_mapping)
        out = torch.empty_like(q0)
        nd = self.num_decodes
        if nd:
            paged_decode(
                q0[:nd],
                kc,
                vc,
                self.block_tables[:nd],
                self.context_lens[:nd],
                self.scale,
                num_splits=self.num_splits,
                out=out[:nd],
            )
        if self.num_seqs > nd:
            paged_prefill(
                q0,
                kc,
                vc,
                self.block_tables[nd:],
                self.query_start[nd:],
                self.context_lens[nd:],
                self.max_query_len,
                self.scale,
                out=out,
            )
        return out.unsqueeze(0)
