"""The Qwen3 SwiGLU MLP: down(silu(gate(x)) * up(x)), with the fused gate|up paths of inference and training."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmray.config import ModelConfig
from llmray.model.ops import ModelOps, project


class Qwen3MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

        self.gate_up_weight: torch.Tensor | None = None  # set by fuse_projections (inference)
        # as qkv_linear, for the fused gate|up projection
        self.gate_up_linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        # set from outside (LoRA): x, fused weight, the gated SwiGLU -> silu(gate) * up with per-row adapter
        # deltas (the LoRA expand and the SwiGLU in one launch)
        self.gate_up_act: (
            Callable[[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]
            | None
        ) = None

    def forward(self, x: torch.Tensor, ops: ModelOps) -> torch.Tensor:
        if (
            self.gate_up_weight is not None
            and (type(self.gate_proj) is nn.Linear or self.gate_up_linear is not None)
            and not torch.is_grad_enabled()
        ):
            w = self.gate_up_weight
            if self.gate_up_act is not None and ops.gated_swiglu is not None:
                return self.down_proj(self.gate_up_act(x, w, ops.gated_swiglu))
            # one GEMM: (..., 2I) = [gate | up]
            gate_up = F.linear(x, w) if self.gate_up_linear is None else self.gate_up_linear(x, w)
            if ops.gated_swiglu is not None:
                return self.down_proj(ops.gated_swiglu(gate_up))
            return self.down_proj(ops.swiglu(*gate_up.chunk(2, dim=-1)))
        if ops.swiglu_fused is not None and torch.is_grad_enabled() and self._plain():
            # training: one GEMM over [gate; up] (a bf16 copy of the two weights under autocast) and a
            # SwiGLU whose backward writes one (..., 2I) gradient: the input gradient is one GEMM, not two + a sum
            weights = [self.gate_proj.weight, self.up_proj.weight]
            if ops.linear is not None:
                gate_up = ops.linear(x, weights)
            else:
                gate_up = F.linear(x, _cat_weights(weights, x.device.type))
            return project(self.down_proj, ops.swiglu_fused(gate_up), ops)
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))

    def _plain(self) -> bool:
        return type(self.gate_proj) is nn.Linear and type(self.up_proj) is nn.Linear


def _cat_weights(weights: list[torch.Tensor], device_type: str) -> torch.Tensor:
    """The weights stacked along the output dim, in the autocast dtype when autocast is on (cast, then cat:
    the copy is made at the narrower dtype; gradients flow back to each weight in its own dtype)."""
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        weights = [w.to(dt) for w in weights]
    return torch.cat(weights)
