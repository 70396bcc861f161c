"""The training step's GEMM shapes (qwen3-0.6b, 8 x 2,048 tokens, bf16) by BLAS backend and operand order (GPU).

The K = 1,024 GEMMs (the qkv and gate|up forward, the o and down input gradients) run at ~675-715 TFLOP/s
against ~750-790 for the long-K ones (bench/results/train_profile.json). Per shape, ms and TFLOP/s
(``triton.testing.do_bench``, median of rounds) for: torch's default BLAS (``default``), cuBLASLt
(``torch.backends.cuda.preferred_blas_library("cublaslt")``: ``lt``), and the same product computed as its
transpose (C^T = B^T A^T, the output then read as a transposed view: ``swap``; cuBLAS sees the operands in
the other roles and may pick another kernel). Writes OUT/gemm_select.json.

    python bench/train_gemm_select.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

# name: (M, K, N) of C (M, N) = A (M, K) @ B (K, N), B given as the (N, K) weight (F.linear) or (K, N)
SHAPES = {
    "qkv_fwd": (16384, 1024, 4096, "linear"),
    "gate_up_fwd": (16384, 1024, 6144, "linear"),
    "o_dgrad": (16384, 1024, 2048, "mm"),
    "down_dgrad": (16384, 1024, 3072, "mm"),
    "down_fwd": (16384, 3072, 1024, "linear"),
    "qkv_dgrad": (16384, 4096, 1024, "mm"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from triton.testing import do_bench

    dev, bf = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    cases = {}
    for name, (m, k, n, kind) in SHAPES.items():
        a = torch.randn(m, k, device=dev, dtype=bf)
        if kind == "linear":  # weight (N, K): C = A W^T
            w = torch.randn(n, k, device=dev, dtype=bf) * k**-0.5
            cases[name] = {
                "default": lambda a=a, w=w: torch.nn.functional.linear(a, w),
                "swap": lambda a=a, w=w: torch.mm(w, a.t()).t(),
            }
        else:  # weight (K, N) row-major as the input gradient's dy @ W
            w = torch.randn(k, n, device=dev, dtype=bf) * k**-0.5
            cases[name] = {
                "default": lambda a=a, w=w: torch.mm(a, w),
                "swap": lambda a=a, w=w: torch.mm(w.t(), a.t()).t(),
            }
        ref = cases[name]["default"]().float()
        res["shapes"][name] = {
            "mkn": [m, k, n],
            "swap_max_abs_diff": float((cases[name]["swap"]().float() - ref).abs().max()),
        }
    times: dict[str, list[float]] = {}
    lib0 = torch.backends.cuda.preferred_blas_library()
    for _ in range(args.rounds):
        for name, fns in cases.items():
            for var, fn in fns.items():
                times.setdefault(f"{name} {var}", []).append(do_bench(fn, warmup=10, rep=50))
            torch.backends.cuda.preferred_blas_library("cublaslt")
            times.setdefault(f"{name} lt", []).append(do_bench(fns["default"], warmup=10, rep=50))
            torch.backends.cuda.preferred_blas_library(lib0)
    for key, ts in times.items():
        name, var = key.split()
        m, k, n = res["shapes"][name]["mkn"]
        ms = statistics.median(ts)
        res["shapes"][name][var] = {"ms": round(ms, 4), "tflops": round(2 * m * k * n / ms / 1e9, 1)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gemm_select.json").write_text(json.dumps(res, indent=1))
    for name, r in res["shapes"].items():
        print(name, {v: r[v]["tflops"] for v in ("default", "lt", "swap") if v in r})


if __name__ == "__main__":
    main()
