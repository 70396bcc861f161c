"""Projection weights read together: the training GEMM groups, and the fused copies the engine uses.

Inference concatenates q/k/v (for a single-token forward) and gate/up into one weight each, so a layer
runs one GEMM where it ran three or two. Parameters, names and state_dict are untouched: the fused weights
are extra plain tensors on the attention/MLP modules (``qkv_weight``, ``gate_up_weight``), read only
without autograd. ``Qwen3ForCausalLM`` exposes these as methods; they take its decoder layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn


def projection_groups(layers: Sequence[Any]) -> list[list[torch.Tensor]]:
    """Per layer: [q, k, v], [o], [gate, up], [down] — plain nn.Linear layers only (a LoRA-wrapped one is left out)."""
    groups: list[list[torch.Tensor]] = []
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        for mods in ([a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj, m.up_proj], [m.down_proj]):
            if all(type(x) is nn.Linear for x in mods):
                groups.append([x.weight for x in mods if isinstance(x, nn.Linear)])
    return groups


@torch.no_grad()
def fuse_projections(layers: Sequence[Any]) -> None:
    """Concatenated copies of q/k/v and gate/up, for projections that are plain nn.Linear or whose wrapper
    set the fused hook (LoRA's ``qkv_linear``/``gate_up_linear`` add the adapters' deltas to the fused output)."""
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        projs = [attn.q_proj, attn.k_proj, attn.v_proj]
        plain = attn.qkv_linear is not None or all(type(p) is nn.Linear for p in projs)
        if attn.qkv_weight is None and plain:
            attn.qkv_weight = torch.cat([p.weight for p in projs])
        projs = [mlp.gate_proj, mlp.up_proj]
        plain = mlp.gate_up_linear is not None or all(type(p) is nn.Linear for p in projs)
        if mlp.gate_up_weight is None and plain:
            mlp.gate_up_weight = torch.cat([p.weight for p in projs])


def unfuse_projections(layers: Sequence[Any]) -> bool:
    """Drop the fused copies; True if there were any."""
    fused = False
    for layer in layers:
        fused = fused or layer.self_attn.qkv_weight is not None or layer.mlp.gate_up_weight is not None
        layer.self_attn.qkv_weight = layer.mlp.gate_up_weight = None
    return fused
