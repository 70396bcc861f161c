"""add_rms_norm's backward as training runs it: the row-range kernel vs the pipelined one's variants.

Inputs as in a qwen3 training step under bf16 autocast: bf16 dy, the fp32 residual sum x and its fp32
gradient ds in; fp32 dx and the bf16 branch's dx2 out (one pass), dW. Per width and variant (module flags of
``llmray.kernels.rmsnorm``): whether dx / dx2 are bit-identical to the row-range kernel's, dW's largest
relative difference, ms a call (CUDA graph of ``--calls`` calls, ``train_micro.graph_ms``; the median over
interleaved rounds) and GB/s.
With ``--pytest`` the GPU tests of tests/kernels/test_rmsnorm.py run in the background while the variants
compile (timing starts after they end). Writes OUT/rms_bwd.json after every phase.

    python bench/rms_bwd_micro.py --out DIR [--widths 1024,4096] [--pytest]
    TRITON_INTERPRET=1 python bench/rms_bwd_micro.py --smoke --out /tmp/rb   # CPU plumbing check
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llmray.kernels.rmsnorm as RN  # noqa: E402, N812
from bench.train_micro import graph_ms  # noqa: E402
from bench.train_ns import Flags as _ModuleFlags  # noqa: E402

T0 = time.perf_counter()
# (name, flags): flags over the module's defaults; "old" (the row-range kernel) is the reference. H200,
# 2026-12-01 (bench/results/rms_bwd_micro.json; that run's "pipe ..." rows other than the tlsum ones took the
# row sum in a spelled-out order since removed, which was slower and not bit-identical): 16,384 x 1,024: old
# 0.0743 ms, ptr-loads 0.0765 (bit-identical), desc-loads 0.0746; x 4,096: old 0.3057, ptr-loads 0.2839
# (bit-identical), desc-loads 0.2770
P = {"BWD_PIPELINED": True, "PIPE_MIN_N": 0}
V = {
    "old": {"BWD_PIPELINED": False},
    "ptr-loads": {**P, "PIPE_LOADS": 2},
    "ptr-loads 1/SM": {**P, "PIPE_LOADS": 2, "PIPE_PER_SM": 1},
    "ptr-loads 3/SM": {**P, "PIPE_LOADS": 2, "PIPE_PER_SM": 3},
    "ptr-loads 4 stages": {**P, "PIPE_LOADS": 2, "PIPE_STAGES": 4},
    "ptr-loads bm4 w8": {**P, "PIPE_LOADS": 2, "PIPE_CONFIG": (4, 8)},
    "ptr-loads evict-first": {**P, "PIPE_LOADS": 2, "PIPE_EVICT": "evict_first"},
    "dy-ptr": {**P, "PIPE_LOADS": 1},
    "desc-loads": {**P, "PIPE_LOADS": 0},
    "desc-loads 3/SM": {**P, "PIPE_LOADS": 0, "PIPE_PER_SM": 3},
    "desc-loads bm4 w8": {**P, "PIPE_LOADS": 0, "PIPE_CONFIG": (4, 8)},
    "desc-loads tma-store dx": {**P, "PIPE_LOADS": 0, "PIPE_STORES": 1},
    "desc-loads bm1 w16": {**P, "PIPE_LOADS": 0, "PIPE_CONFIG": (1, 16)},
}
WIDTHS = {  # the variants a width runs
    1024: [k for k in V if k != "desc-loads bm1 w16"],
    4096: ["old", "ptr-loads", "ptr-loads 1/SM", "ptr-loads 4 stages", "ptr-loads evict-first", "desc-loads",
           "desc-loads bm1 w16"],
}  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def rn_flags(flags: dict) -> _ModuleFlags:
    """``llmray.kernels.rmsnorm``'s module flags set for a block, then restored."""
    return _ModuleFlags({f"llmray.kernels.rmsnorm.{k}": v for k, v in flags.items()})


def inputs(rows: int, n: int, dev: str) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, n, generator=g).to(dev)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(dev)
    _, _, rstd = RN.rms_norm_fwd(x, w, 1e-6)
    dy = torch.randn(rows, n, generator=g).to(dev, torch.bfloat16)
    ds = torch.randn(rows, n, generator=g).to(dev)
    return {"x": x, "w": w, "rstd": rstd, "dy": dy, "ds": ds}


def call(t: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx2 = torch.empty_like(t["dy"])
    dx, dw = RN.rms_norm_bwd(t["dy"], t["x"], t["w"], t["rstd"], ds=t["ds"], dx2=dx2)
    return dx, dx2, dw


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--widths", default="1024,4096")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pytest", action="store_true", help="the GPU tests in the background meanwhile")
    p.add_argument("--pytest-timeout", type=float, default=50.0, help="seconds from the start")
    p.add_argument("--only", default="", help="variant names to run (comma-separated; old always runs)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, interpreter)")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    RN.PIPE_INTERPRET = True  # (CPU smoke runs)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, widths = (40, [256, 1024]) if a.smoke else (a.rows, [int(w) for w in a.widths.split(",")])
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "rows": rows, "defaults": {}}
    res["defaults"] = {k: getattr(RN, k) for k in dir(RN) if k.startswith(("PIPE_", "BWD_"))}
    proc = None
    if a.pytest and cuda:
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels/test_rmsnorm.py"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(out / "pytest.log", "w"), stderr=subprocess.STDOUT)
        log(f"pytest started: {' '.join(cmd)}")
    only = set(filter(None, a.only.split(",")))
    fns = {}
    for n in widths:
        t = inputs(rows, n, dev)
        moved = rows * n * (2 + 4 + 4 + 4 + 2)
        r = res.setdefault(str(n), {"gb_moved": round(moved / 1e9, 4)})
        with rn_flags({"BWD_PIPELINED": False}):
            ref = call(t)
        for name in WIDTHS.get(n, list(V)):
            flags = V[name]
            if only and name not in only and name != "old":
                continue
            try:
                with rn_flags(flags):
                    got = call(t)
                rel = ((got[2] - ref[2]).abs().max() / ref[2].abs().max()).item()
                r[name] = {"dx_bit_identical": torch.equal(got[0], ref[0]),
                           "dx2_bit_identical": torch.equal(got[1], ref[1]),
                           "dx_max_abs_diff": (got[0] - ref[0]).abs().max().item(), "dw_max_rel_diff": rel,
                           "flags": {k: v for k, v in flags.items()}, "ms": []}  # fmt: skip
                fns[(n, name)] = (flags, t, moved)
            except Exception as e:  # a variant that does not compile or launch: noted, the rest go on
                r[name] = f"{type(e).__name__}: {str(e)[:400]}"
            log(f"{n} {name}: {r[name]}")
        (out / "rms_bwd.json").write_text(json.dumps(res, indent=1, default=str))
    if proc is not None:
        try:
            rc = proc.wait(timeout=max(1.0, a.pytest_timeout - (time.perf_counter() - T0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        res["pytest_rc"] = rc
        log(f"pytest rc {rc}: {(out / 'pytest.log').read_text().strip().splitlines()[-1:]}")
    for rnd in range(a.rounds if cuda else 1):  # interleaved rounds: clock drift hits every variant alike
        for (n, name), (flags, t, _) in fns.items():
            with rn_flags(flags):
                res[str(n)][name]["ms"].append(graph_ms(lambda t=t: call(t), a.calls, cuda))
        log(f"round {rnd} done")
    for (n, name), (_, _, moved) in fns.items():
        v = res[str(n)][name]
        v["ms_median"] = round(statistics.median(v["ms"]), 4)
        v["gb_s"] = round(moved / v["ms_median"] / 1e6)
        v["ms"] = [round(x, 4) for x in v["ms"]]
        log(f"{n} {name}: {v['ms_median']:.4f} ms {v['gb_s']} GB/s bit-identical {v['dx_bit_identical']}/"
            f"{v['dx2_bit_identical']} dW rel {v['dw_max_rel_diff']:.1e}")  # fmt: skip
    (out / "rms_bwd.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
