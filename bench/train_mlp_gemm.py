"""The training MLP's GEMM + SwiGLU, fused (kernels/swiglu_gemm.py) against cuBLAS + the SwiGLU kernel (GPU).

qwen3-0.6b's MLP on 8 x 2,048 tokens (hidden 1,024, intermediate 3,072), bf16:

- ``fwd``: cuBLAS ``x @ [Wg; Wu]^T`` then ``swiglu_fused_fwd`` (the committed path) against ``gemm_swiglu``
  at each config; ``gemm``: cuBLAS ``x @ Wg^T`` against the same Triton kernel without its epilogue (is the
  GEMM itself or the epilogue the gap?).
- ``bwd``: cuBLAS ``dy @ Wd`` then ``swiglu_fused_bwd`` against ``gemm_swiglu_bwd`` at each config.

Each variant: the max error against the unfused path and the share of elements that differ (summation order
only: fp32 accumulation both ways), ms per call (``triton.testing.do_bench``, median; rounds alternate the
variants so clock drift hits all) and TFLOP/s of the GEMM. Writes OUT/mlp_gemm.json.

    python bench/train_mlp_gemm.py --out DIR [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmray.kernels import swiglu_gemm as sg  # noqa: E402
from llmray.kernels.swiglu import swiglu_fused_bwd, swiglu_fused_fwd  # noqa: E402

# (BM, BN, BK, stages, warps, GROUP_M, programs per SM), then (FLATTEN, WARP_SPECIALIZE)
# (H200, first sweep: fwd best (128, 64, 64, 3, 4, 8, 2) 0.396 ms vs cuBLAS + SwiGLU 0.351; bwd best
# (64, 128, 64, 4, 4, 8, 2) 0.318 vs 0.274; the GEMM alone at most 593 TFLOP/s vs cuBLAS 693)
# (H200, second sweep: flatten / warp_specialize: fwd no better; bwd (128, 128, 64, 4, 8, 8, 1) flatten 0.2805 ms vs
# 0.2876; warp_specialize fails to compile in Triton 3.6 for Hopper or changes nothing)
# knobs: (FLATTEN, WARP_SPECIALIZE, BWD_PREFETCH, BWD_PTR_STORE)
FWD = [
    ((128, 64, 64, 3, 4, 8, 2), False, False, False, False),
    ((128, 128, 64, 4, 8, 8, 1), True, False, False, False),
]
BWD_KNOBS = [(True, False, False, False), (False, False, True, False), (False, False, True, True),
             (True, False, True, False), (True, False, True, True), (False, False, False, True)]  # fmt: skip
BWD = [(c, *kn) for c in [(128, 128, 64, 4, 8, 8, 1), (128, 128, 64, 3, 8, 8, 1), (128, 64, 64, 4, 4, 8, 2)]
       for kn in BWD_KNOBS]  # fmt: skip


def _knobs(flat: bool, ws: bool, pf: bool = False, ps: bool = False) -> None:
    sg.FLATTEN, sg.WARP_SPECIALIZE, sg.BWD_PREFETCH, sg.BWD_PTR_STORE = flat, ws, pf, ps


def _err(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {
        "max_abs": float((a.float() - b.float()).abs().max()),
        "frac_diff": float((a != b).float().mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=3072)
    args = ap.parse_args()
    from triton.testing import do_bench

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    m, k, i = args.m, args.hidden, args.inter
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(2 * i, k, device=dev) / k**0.5).to(torch.bfloat16)
    wd = (torch.randn(k, i, device=dev) / i**0.5).to(torch.bfloat16)
    dy = torch.randn(m, k, device=dev, dtype=torch.bfloat16) * 1e-2
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [m, k, i]}
    import triton

    res["triton"] = triton.__version__
    fl_fwd, fl_bwd, fl_gemm = 2 * m * k * 2 * i, 2 * m * k * i, 2 * m * k * i

    def base_fwd():
        gu = torch.nn.functional.linear(x, w)
        return gu, swiglu_fused_fwd(gu)

    gu0, h0 = base_fwd()

    def base_bwd():
        return swiglu_fused_bwd(dy @ wd, gu0)

    dgu0 = base_bwd()
    variants: dict[str, tuple] = {
        "fwd cublas+swiglu": (base_fwd, fl_fwd),
        "bwd cublas+swiglu": (base_bwd, fl_bwd),
        "gemm cublas": (lambda: torch.nn.functional.linear(x, w[:i]), fl_gemm),
    }
    checks: dict[str, dict] = {}
    for cfg, flat, ws, _pf, _ps in FWD:
        name = f"fwd {cfg} flat={int(flat)} ws={int(ws)}"
        try:
            _knobs(flat, ws)
            gu, h = sg.gemm_swiglu(x, w, cfg)
            torch.cuda.synchronize()
            checks[name] = {"gu": _err(gu, gu0), "h": _err(h, h0)}
            variants[name] = ((lambda c=cfg, f=flat, s=ws: (_knobs(f, s), sg.gemm_swiglu(x, w, c))), fl_fwd)
            sg.gemm_swiglu(x, w, cfg, epi=0)
            variants[name.replace("fwd", "gemm")] = (
                (lambda c=cfg, f=flat, s=ws: (_knobs(f, s), sg.gemm_swiglu(x, w, c, epi=0))),
                fl_gemm,
            )
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result
            checks[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    for cfg, flat, ws, pf, ps in BWD:
        name = f"bwd {cfg} flat={int(flat)} ws={int(ws)} pf={int(pf)} ps={int(ps)}"
        try:
            _knobs(flat, ws, pf, ps)
            d = sg.gemm_swiglu_bwd(dy, wd, gu0, cfg)
            torch.cuda.synchronize()
            checks[name] = {"dgu": _err(d, dgu0)}
            variants[name] = (
                (lambda c=cfg, k=(flat, ws, pf, ps): (_knobs(*k), sg.gemm_swiglu_bwd(dy, wd, gu0, c))),
                fl_bwd,
            )
        except Exception as e:  # noqa: BLE001
            checks[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    res["checks"] = checks
    times: dict[str, list[float]] = {n: [] for n in variants}
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        for n, (fn, _fl) in variants.items():
            times[n].append(do_bench(fn, warmup=10, rep=40))
    res["bench_s"] = round(time.perf_counter() - t0, 1)
    rows = {}
    for n, (_fn, fl) in variants.items():
        ms = statistics.median(times[n])
        rows[n] = {
            "ms": round(ms, 4),
            "tflops": round(fl / ms / 1e9, 1),
            "all_ms": [round(t, 4) for t in times[n]],
        }
    res["times"] = rows
    for part in ("fwd", "bwd", "gemm"):
        cands = {n: r["ms"] for n, r in rows.items() if n.startswith(part + " (")}
        if cands:
            best = min(cands, key=cands.get)
            base = rows[f"{part} cublas+swiglu" if part != "gemm" else "gemm cublas"]["ms"]
            res[f"best_{part}"] = {"variant": best, "ms": cands[best], "base_ms": base,
                                   "speedup": round(base / cands[best], 3)}  # fmt: skip
    (out / "mlp_gemm.json").write_text(json.dumps(res, indent=1))
    for n, r in rows.items():
        print(f"{n:56s} {r['ms']:.4f} ms {r['tflops']:7.1f} TFLOP/s  {checks.get(n, '')}")
    for part in ("fwd", "bwd", "gemm"):
        print(part, res.get(f"best_{part}"))


if __name__ == "__main__":
    main()
