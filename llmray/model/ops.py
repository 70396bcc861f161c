"""The element-wise and loss ops the model calls, as a swappable set.

``TORCH_OPS`` is plain PyTorch (``llmray.kernels.reference``: the CPU path); ``resolve_ops("triton")`` returns
the Triton implementations from ``llmray.kernels`` with the same signatures. The model never branches on
the implementation: it calls ``self.ops.<op>``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from llmray.kernels.reference import (
    add_rms_norm_ref,
    linear_cross_entropy_ref,
    rms_norm_ref,
    rope_ref,
    swiglu_ref,
)


@dataclass(frozen=True)
class ModelOps:
    """One implementation of each op the model calls (signatures as in ``llmray.kernels.reference``)."""

    name: str
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    swiglu: Callable[..., torch.Tensor]
    linear_cross_entropy: Callable[..., torch.Tensor]
    # silu(x[..., :I]) * x[..., I:] over a fused gate|up projection (the engine's fused MLP)
    gated_swiglu: Callable[..., torch.Tensor] | None = None
    # inference only: rope(rms_norm(q), rms_norm(k)) in one launch, q/k may be strided views of a fused row
    # (kernels/qk_norm_rope.py); None: the model calls rms_norm twice and rope
    qk_norm_rope: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    # training: differentiable silu(x[..., :I]) * x[..., I:] whose backward writes one (..., 2I) gradient; with
    # it the model's training forward runs gate/up as one GEMM (kernels/swiglu.py swiglu_fused); None: two
    swiglu_fused: Callable[..., torch.Tensor] | None = None
    # training: qk_norm_rope with a backward (kernels/qk_norm_rope_train.py); None: rms_norm twice and rope
    qk_norm_rope_train: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    # training: linear(x, [w, ...]) over fp32 master weights under autocast with fp32 weight gradients out of
    # the GEMM (model/master_linear.py); None: the nn.Linear modules (autocast casts, then a gradient cast)
    linear: Callable[..., torch.Tensor] | None = None
    # training, with ``linear``: q|k|v as one GEMM, then (rope(norm(q)), rope(norm(k)), v) whose backward
    # writes one fused input gradient (kernels/qk_norm_rope_train.py qkv_norm_rope_train); None: three GEMMs
    qkv_norm_rope_train: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def _gated_swiglu_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return swiglu_ref(gate, up)


TORCH_OPS = ModelOps(
    name="torch",
    rms_norm=rms_norm_ref,
    add_rms_norm=add_rms_norm_ref,
    rope=rope_ref,
    swiglu=swiglu_ref,
    linear_cross_entropy=linear_cross_entropy_ref,
    gated_swiglu=_gated_swiglu_torch,
)


FUSED_QKV_TRAIN = True  # the fused q|k|v training path in the Triton op set (W1 H200: -1 ms a step)


@functools.cache
def triton_ops() -> ModelOps:
    """The Triton op set (imported on first use: ``@triton.jit`` binds the interpreter at import time)."""
    from llmray.kernels.cross_entropy import linear_cross_entropy
    from llmray.kernels.gated_swiglu import gated_swiglu
    from llmray.kernels.qk_norm_rope import qk_norm_rope
    from llmray.kernels.qk_norm_rope_train import qk_norm_rope_train, qkv_norm_rope_train
    from llmray.kernels.rmsnorm import add_rms_norm, rms_norm
    from llmray.kernels.rope import rope
    from llmray.kernels.swiglu import swiglu, swiglu_fused
    from llmray.model.master_linear import master_linear

    return ModelOps(
        name="triton",
        rms_norm=rms_norm,
        add_rms_norm=add_rms_norm,
        rope=rope,
        swiglu=swiglu,
        linear_cross_entropy=linear_cross_entropy,
        gated_swiglu=gated_swiglu,
        qk_norm_rope=qk_norm_rope,
        swiglu_fused=swiglu_fused,
        qk_norm_rope_train=qk_norm_rope_train,
        linear=master_linear,
        qkv_norm_rope_train=qkv_norm_rope_train if FUSED_QKV_TRAIN else None,
    )


def resolve_ops(kernels: str, device: torch.device | str | None = None) -> ModelOps:
    """ "torch" | "triton" | "auto" (Triton on CUDA, torch elsewhere) -> the op set."""
    if kernels == "auto":
        kernels = "triton" if torch.device(device or "cpu").type == "cuda" else "torch"
    if kernels == "torch":
        return TORCH_OPS
    if kernels == "triton":
        try:
            return triton_ops()
        except ImportError as e:  # triton missing: say so rather than silently using torch
            raise RuntimeError(f"kernels='triton' needs the triton package: {e}") from e
    raise ValueError(f"kernels must be 'torch', 'triton' or 'auto', got {kernels!r}")


def project(module: nn.Module, x: torch.Tensor, ops: ModelOps) -> torch.Tensor:
    """``module(x)``; a plain nn.Linear in training goes through ``ops.linear`` where the op set has one."""
    if (
        ops.linear is not None
        and type(module) is nn.Linear
        and module.bias is None
        and torch.is_grad_enabled()
    ):
        return ops.linear(x, [module.weight])
    return module(x)
