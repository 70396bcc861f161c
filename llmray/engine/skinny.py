"""Short prefill chunks' projections through the weight-streaming GEMM (kernels/skinny_gemm.py).

A one-sequence chunk of at most 64 tokens (e.g. the suffix after a cached prefix) reads each projection's
weight once for a few rows: bound by memory, where cuBLAS's tiles leave bandwidth unused. While the runner
captures (or runs) such a step, ``skinny_projections(model, configs)`` routes the fused q|k|v and gate|up
GEMMs (the model's ``qkv_linear`` / ``gate_up_linear`` hooks, where no LoRA hook holds them) and o_proj /
down_proj (plain ``nn.Linear``) through ``skinny_linear``; shapes it does not fit fall back to F.linear.
Everything is restored on exit: other graphs and eager steps keep cuBLAS.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from llmray.kernels.skinny_gemm import skinny_fits, skinny_linear

MAX_ROWS = 64
INTERPRETED = False  # (CPU tests under TRITON_INTERPRET=1 set it: the kernel on CPU tensors)


def _linear(configs: dict[tuple[int, int], tuple | None]):
    def run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        cfg = configs.get((w.shape[0], w.shape[1]))
        if (
            cfg is None  # (an untuned shape stays on cuBLAS)
            or (x.device.type != "cuda" and not INTERPRETED)
            or rows.shape[0] > MAX_ROWS
            or not skinny_fits(rows, w, cfg)
        ):
            return F.linear(x, w)
        return skinny_linear(rows, w, cfg).view(*x.shape[:-1], w.shape[0])

    return run


@contextmanager
def skinny_projections(model: nn.Module, configs: dict[tuple[int, int], tuple | None]) -> Iterator[None]:
    """Within the block, the model's projections of <= 64 rows run on ``skinny_linear`` (``configs``:
    (N, K) -> kernel config (bench/gemm_skinny.py measures them); other shapes keep cuBLAS)."""
    run = _linear(configs)
    undo: list[tuple[object, str, object]] = []
    for mod in model.modules():
        for hook in ("qkv_linear", "gate_up_linear"):
            if hasattr(mod, hook) and getattr(mod, hook) is None:
                undo.append((mod, hook, None))
                setattr(mod, hook, run)
        for name in ("o_proj", "down_proj"):
            lin = getattr(mod, name, None)
            if type(lin) is nn.Linear and lin.bias is None and "forward" not in vars(lin):
                undo.append((lin, "forward", _MISSING))
                lin.forward = lambda x, w=lin.weight: run(x, w)
    try:
        yield
    finally:
        for obj, attr, old in reversed(undo):
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


_MISSING = object()
