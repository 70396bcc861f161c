"""The Triton op set the model selects with ``kernels="triton"`` (signatures as ``llmray.model.ops.TORCH_OPS``)."""

from __future__ import annotations

from llmray.kernels.cross_entropy import linear_cross_entropy
from llmray.kernels.rmsnorm import add_rms_norm, rms_norm
from llmray.kernels.rope import rope
from llmray.kernels.swiglu import swiglu
from llmray.model.ops import ModelOps

TRITON_OPS = ModelOps(
    name="triton",
    rms_norm=rms_norm,
    add_rms_norm=add_rms_norm,
    rope=rope,
    swiglu=swiglu,
    linear_cross_entropy=linear_cross_entropy,
)
