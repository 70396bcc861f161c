"""Plain-PyTorch references of the model's element-wise and loss ops.

The CPU path of the model and the baseline every Triton kernel is tested against. Pure torch: importing this
module needs no triton, so ``llmray.model`` loads where triton is not installed. Each kernel module re-exports
its reference as ``<op>_ref`` next to its kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / rms(x) * weight over the last dim; computed in fp32, returned in x.dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual): the pre-norm block's residual stream update."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


def rope_ref(
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


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of (hidden @ weight.T) against targets. hidden (N, h), weight (V, h), targets (N,)."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)
