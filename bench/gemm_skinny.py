"""The prefix hit's projections at M = 48-64 rows: cuBLAS (F.linear) vs the weight-streaming Triton GEMM.

    python bench/gemm_skinny.py --out DIR   # one GPU, ~30 s

Each (N, K) of Qwen3-0.6B's layer (qkv, o_proj, gate_up, down_proj) over 28 distinct weights (one per
layer: nothing stays in L2 between calls, as in the model), 28 calls captured in one CUDA graph; per-call
device us = replay time / 28 (median of 20 replays). Checks every config against fp64 first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmray.kernels.skinny_gemm import skinny_fits, skinny_linear  # noqa: E402

SHAPES = {"qkv": (4096, 1024), "o_proj": (1024, 2048), "gate_up": (6144, 1024), "down_proj": (1024, 3072)}
CONFIGS = [
    (16, 128, 1, 4, 4), (16, 256, 1, 3, 4), (32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (16, 128, 2, 4, 4),
    (32, 128, 2, 4, 4), (32, 128, 4, 4, 4), (64, 128, 4, 4, 4), (64, 64, 1, 5, 4), (32, 64, 1, 6, 4),
]  # fmt: skip
LAYERS = 28


def graph_us(fn, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / LAYERS)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="48,64")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(0), "layers": LAYERS, "us_per_call": {}, "errors": {}}
    t0 = time.perf_counter()
    for name, (n, k) in SHAPES.items():
        ws = [(torch.randn(n, k, device=dev) / k**0.5).to(torch.bfloat16) for _ in range(LAYERS)]
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            ref = x.double() @ ws[0].double().T
            row = {"cublas": graph_us(lambda x=x, ws=ws: [F.linear(x, w) for w in ws])}
            for cfg in CONFIGS:
                if not skinny_fits(x, ws[0], cfg):
                    continue
                y = skinny_linear(x, ws[0], cfg)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                res["errors"][f"{name} m{m} {cfg}"] = err
                if not err < 1e-2:
                    print("BAD", name, m, cfg, err, flush=True)
                    continue
                row[str(cfg)] = graph_us(lambda x=x, ws=ws, cfg=cfg: [skinny_linear(x, w, cfg) for w in ws])
            best = min((v, c) for c, v in row.items() if c != "cublas")
            row["best"] = best[1]
            row["speedup"] = row["cublas"] / best[0]
            res["us_per_call"][f"{name} m{m}"] = row
            print(
                f"{name:10s} m={m:3d} cublas {row['cublas']:6.2f} us  best {best[0]:6.2f} us {best[1]}",
                flush=True,
            )
            (out / "gemm_skinny.json").write_text(json.dumps(res, indent=1))
    for m in [int(r) for r in args.rows.split(",")]:
        rows = [res["us_per_call"][f"{s} m{m}"] for s in SHAPES]
        cub = sum(r["cublas"] for r in rows) * LAYERS / 1e3
        best = sum(r[r["best"]] for r in rows) * LAYERS / 1e3
        res[f"step_ms m{m}"] = {"cublas": cub, "best_per_shape": best}
        print(f"m={m}: 4 GEMMs x {LAYERS} layers: cuBLAS {cub:.3f} ms, best skinny {best:.3f} ms", flush=True)
    res["wall_s"] = time.perf_counter() - t0
    (out / "gemm_skinny.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
