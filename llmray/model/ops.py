"""The element-wise and loss ops the model calls, as a swappable set.

``TORCH_OPS`` is plain PyTorch (the reference, and the CPU path); ``resolve_ops("triton")`` returns the
Triton implementations from ``llmray.kernels`` with the same signatures. The model never branches on
the implementation: it calls ``self.ops.<op>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / rms(x) * weight over the last dim; computed in fp32, returned in x.dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual): the pre-norm block's residual stream update."""
    s = x + residual
    return rms_norm_torch(s, weight, eps), s


def rope_torch(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, rotate-half (GPT-NeoX / HF Qwen3) layout.

    q (B, T, H, D), k (B, T, Hkv, D), positions (B, T) int64, cos/sin (max_pos, D/2) fp32 tables.
    """
    c = cos[positions].unsqueeze(-2)  # (B, T, 1, D/2)
    s = sin[positions].unsqueeze(-2)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rot(q), rot(k)


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def linear_cross_entropy_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of (hidden @ weight.T) against targets. hidden (N, h), weight (V, h), targets (N,)."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)


@dataclass(frozen=True)
class ModelOps:
    """One implementation of each op the model calls (signatures as the torch functions above)."""

    name: str
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    swiglu: Callable[..., torch.Tensor]
    linear_cross_entropy: Callable[..., torch.Tensor]


TORCH_OPS = ModelOps(
    name="torch",
    rms_norm=rms_norm_torch,
    add_rms_norm=add_rms_norm_torch,
    rope=rope_torch,
    swiglu=swiglu_torch,
    linear_cross_entropy=linear_cross_entropy_torch,
)


def resolve_ops(kernels: str, device: torch.device | str | None = None) -> ModelOps:
    """ "torch" | "triton" | "auto" (Triton on CUDA, torch elsewhere) -> the op set."""
    if kernels == "auto":
        kernels = "triton" if torch.device(device or "cpu").type == "cuda" else "torch"
    if kernels == "torch":
        return TORCH_OPS
    if kernels == "triton":
        try:
            from llmray.kernels.model_ops import TRITON_OPS
        except ImportError as e:  # triton missing: say so rather than silently using torch
            raise RuntimeError(f"kernels='triton' needs the triton package and llmray.kernels: {e}") from e
        return TRITON_OPS
    raise ValueError(f"kernels must be 'torch', 'triton' or 'auto', got {kernels!r}")
