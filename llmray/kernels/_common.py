"""Helpers shared by the Triton kernel launchers: interpreter detection, launch heuristics, row views.

No ``@triton.autotune`` anywhere: configs come from a simple size heuristic, which behaves the same under
``TRITON_INTERPRET=1`` (CPU tests) and on the GPU, and costs no tuning runs at start-up.
"""

from __future__ import annotations

import functools
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter; say which is wrong."""
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"Triton kernels need CUDA tensors (got one on {t.device}); on CPU use kernels='torch' "
                "or set TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter"
            )


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View x (..., N) as (M, N) with unit stride along N (copies only if no such view exists)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > 0 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def row_block_config(n_cols: int, n_rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a row-wise kernel: one tile holds BLOCK_M whole rows.

    Tiles of ~2K elements on 4 warps: narrow q/k-head rows are packed 16 to a program, hidden rows of 1024
    two to a program, wider rows one per program with more warps. Chosen from a launch-config sweep on the
    H200 (bench/results/kernels.json "sweeps"): at 16k x 1024 bf16, (2, 4 warps) beat (8, 16 warps) by 7%
    forward and 38% backward; at 262144 x 128, (16, 4 warps) beat (64, 16 warps) by 16% backward.
    """
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(2048 // block_n, triton.next_power_of_2(max(n_rows, 1)), 64))
    tile = block_m * block_n
    num_warps = 16 if tile >= 8192 else 8 if tile >= 4096 else 4 if tile >= 1024 else 2
    return block_m, block_n, num_warps


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
