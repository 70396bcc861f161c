"""The engine's attention backend for one step: paged KV store + paged attention over packed tokens.

A step's tokens are packed as one row (B=1, T=N), sequence by sequence (one-token chunks first).
``attend`` writes the new K/V into the cache by slot mapping and attends each query over its sequence's
cached context through the block table. On CUDA this is our Triton kernels (``llmray.kernels.kv_store``
and ``paged_attention``); elsewhere the torch references.

The kernels' grids do not depend on the step's contents, so a CUDA graph replays any batch of its size:
the decode kernel runs over ``decode_rows`` sequence slots and skips those whose chunk is not one token
(or that are padding); the prefill kernel runs over a padded work list of (sequence, query block) tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmray.kernels.kv_store import kv_store, kv_store_ref
from llmray.kernels.paged_attention import paged_attention_ref, paged_decode, paged_prefill
from llmray.kernels.qk_norm_rope import qk_norm_rope_store


@dataclass
class PagedAttentionMetadata:
    """Per-step inputs of the attention kernels (passed explicitly to the model: no global context)."""

    k_cache: list[torch.Tensor]  # per layer (num_blocks, block_size, Hkv, D)
    v_cache: list[torch.Tensor]
    slot_mapping: torch.Tensor  # (N,) int64: cache slot of each new token; -1 = padding, not stored
    block_tables: torch.Tensor  # (B, max_blocks) int: one row per sequence slot
    query_start: torch.Tensor  # (B + 1,) int: sequence i's tokens are [query_start[i], query_start[i+1])
    context_lens: torch.Tensor  # (B,) int: cached tokens + this step's tokens
    decode_rows: int  # the decode kernel runs over the first decode_rows sequence slots (0: not launched)
    tiles: tuple[torch.Tensor, torch.Tensor] | None  # prefill work list (tile_seq, tile_m); None: no prefill
    scale: float
    num_splits: int = 1  # split-K programs per decode sequence
    prefill_splits: int = 1  # split-K programs per prefill tile (small steps: few tiles, maybe long prefixes)
    use_triton: bool = True
    k_scales: torch.Tensor | None = None  # (layers, 1) fp32 for an fp8 cache
    v_scales: torch.Tensor | None = None
    # the first decode_rows sequences are one-token chunks at tokens 0..decode_rows-1 (decode-only steps and
    # eager steps): the decode kernel indexes q directly, no query_start lookup before its loads
    decode_direct: bool = False
    # Triton: the model's q/k norm + rope also stores k/v in the cache (``norm_rope_store``, one launch less)
    fuse_store: bool = False

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    @property
    def norm_rope_store(self) -> Callable[..., torch.Tensor] | None:
        """The model's hook (inference): q/k RMSNorm + rope whose k and v go straight to this layer's cache;
        ``attend`` then gets k = v = None. None where the step stores k/v in ``attend``."""
        return self._norm_rope_store if self.fuse_store and self.use_triton else None

    def _norm_rope_store(
        self,
        layer_idx: int,
        q: torch.Tensor,  # (1, N, H, D) views of the fused q|k|v row
        k: torch.Tensor,  # (1, N, Hkv, D)
        v: torch.Tensor,
        q_weight: torch.Tensor,
        k_weight: torch.Tensor,
        eps: float,
        positions: torch.Tensor,  # (1, N)
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        ks = vs = None
        if self.k_scales is not None:
            assert self.v_scales is not None, "an fp8 cache has both scales"
            ks, vs = self.k_scales[layer_idx], self.v_scales[layer_idx]
        kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
        q0 = qk_norm_rope_store(
            q[0],
            k[0],
            v[0],
            q_weight,
            k_weight,
            eps,
            positions[0],
            cos,
            sin,
            kc,
            vc,
            self.slot_mapping,
            ks,
            vs,
        )
        return q0.unsqueeze(0)

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None
    ) -> torch.Tensor:
        """q (1, N, H, D), k/v (1, N, Hkv, D) -> (1, N, H, D); k = v = None: already stored
        (``norm_rope_store``)."""
        q0 = q[0]
        kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
        ks = vs = None
        if self.k_scales is not None:
            assert self.v_scales is not None, "an fp8 cache has both scales"
            ks, vs = self.k_scales[layer_idx], self.v_scales[layer_idx]
        if not self.use_triton:
            assert k is not None and v is not None, "the torch path stores k/v here"
            kv_store_ref(k[0], v[0], kc, vc, self.slot_mapping, ks, vs)
            out = paged_attention_ref(
                q0, kc, vc, self.block_tables, self.query_start, self.context_lens, self.scale, ks, vs
            )
            return out.unsqueeze(0)
        if k is not None:
            assert v is not None, "k and v are stored together"
            kv_store(k[0], v[0], kc, vc, self.slot_mapping, ks, vs)
        out = torch.empty_like(q0)
        if self.decode_rows:
            rows = self.decode_rows
            paged_decode(
                q0,
                kc,
                vc,
                self.block_tables[:rows],
                self.context_lens[:rows],
                self.scale,
                num_splits=self.num_splits,
                out=out,
                query_start=None if self.decode_direct else self.query_start[: rows + 1],
                k_scale=ks,
                v_scale=vs,
            )
        if self.tiles is not None:
            paged_prefill(
                q0,
                kc,
                vc,
                self.block_tables,
                self.query_start,
                self.context_lens,
                0,
                self.scale,
                out=out,
                tiles=self.tiles,
                k_scale=ks,
                v_scale=vs,
                num_splits=self.prefill_splits,
            )
        return out.unsqueeze(0)
