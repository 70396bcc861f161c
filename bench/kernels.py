"""Benchmark the Triton kernels against torch eager and torch.compile of their references (same run).

For each element-wise kernel at Qwen3-0.6B shapes and 16k tokens: forward and forward+backward time and
achieved bandwidth (the minimum bytes the op must move, divided by the time), beside a device-to-device
copy's bandwidth as the ceiling. For the fused linear cross-entropy at 8k tokens x 151,936 vocab x 1024
hidden: time and peak memory against logits + F.cross_entropy. Prints JSON and writes it to --out.

    python bench/kernels.py --out bench/results/kernels.json        # on a GPU
    TRITON_INTERPRET=1 python bench/kernels.py --dry-run --out /tmp/k.json   # CPU: tiny shapes, no timing claims
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmray.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref  # noqa: E402
from llmray.kernels.rmsnorm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402
from llmray.kernels.rope import rope, rope_ref  # noqa: E402
from llmray.kernels.swiglu import swiglu, swiglu_ref  # noqa: E402
from llmray.model.qwen3 import rope_tables  # noqa: E402

CUDA = torch.cuda.is_available()


def bench_ms(fn: Callable[[], object]) -> float:
    """Median time of fn in ms (Triton's do_bench, L2 flushed between runs); wall time once on CPU."""
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


_FLUSH: list[torch.Tensor] = []


def graph_ms(fn: Callable[[], object], reps: int = 10, trials: int = 15) -> float | None:
    """GPU time of fn in ms with no CPU launch gaps: fn replayed from a CUDA graph, each call after a
    256 MB memset that evicts the L2; the time of the memsets alone (another graph) is subtracted.

    At 16k tokens these kernels take tens of microseconds, less than the CPU needs to launch an autograd
    forward+backward, so wall-clock timing (``bench_ms``) measures the launch path, not the kernels."""
    if not CUDA:
        return None
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device="cuda"))
    flush = _FLUSH[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (allocator, lazy compiles)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def capture(body: Callable[[], object]) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                body()
        return g

    def replay_ms(g: torch.cuda.CUDAGraph) -> float:
        times = []
        for _ in range(trials):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2] / reps

    with_fn = capture(lambda: (flush.zero_(), fn()))
    flush_only = capture(flush.zero_)
    return replay_ms(with_fn) - replay_ms(flush_only)


def copy_bandwidth(device: str, nbytes: int) -> dict:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    gpu = graph_ms(lambda: dst.copy_(src))
    out = {"bytes_moved": 2 * nbytes, "wall_ms": ms, "GBps_wall": 2 * nbytes / ms / 1e6, "gpu_ms": gpu}
    out["GBps"] = 2 * nbytes / (gpu or ms) / 1e6
    return out


def _fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grads) -> Callable[[], object]:
    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], grads)

    return run


def elementwise_cases(tokens: int, device: str, dtype: torch.dtype, small: bool) -> list[dict]:
    """(name, triton fn, reference fn, inputs maker, bytes fwd, bytes fwd+bwd) at Qwen3-0.6B widths."""
    hidden, inter, heads, kv_heads, head_dim = (64, 96, 4, 2, 16) if small else (1024, 3072, 16, 8, 128)
    e = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    cos, sin = (t.to(device) for t in rope_tables(head_dim, max(tokens, 2), 1e6))
    positions = torch.arange(tokens, device=device)[None]
    w_h, w_d = 1 + 0.1 * rnd(hidden), 1 + 0.1 * rnd(head_dim)
    m_h, m_qk, m_i = tokens * hidden, tokens * heads * head_dim, tokens * inter
    m_q, m_k = tokens * heads * head_dim, tokens * kv_heads * head_dim
    return [
        dict(name="rms_norm", shape=[tokens, hidden], ops=(rms_norm, rms_norm_ref),
             inputs=lambda: [rnd(tokens, hidden), w_h], consts=[1e-6], grads=[rnd(tokens, hidden)],
             bytes_fwd=2 * m_h * e, bytes_fwd_bwd=5 * m_h * e),
        dict(name="rms_norm_4096", shape=[tokens, 4 * hidden], ops=(rms_norm, rms_norm_ref),
             inputs=lambda: [rnd(tokens, 4 * hidden), 1 + 0.1 * rnd(4 * hidden)], consts=[1e-6],
             grads=[rnd(tokens, 4 * hidden)], bytes_fwd=2 * 4 * m_h * e, bytes_fwd_bwd=5 * 4 * m_h * e),
        dict(name="rms_norm_qk_heads", shape=[tokens, heads, head_dim], ops=(rms_norm, rms_norm_ref),
             inputs=lambda: [rnd(tokens, heads, head_dim), w_d], consts=[1e-6], grads=[rnd(tokens, heads, head_dim)],
             bytes_fwd=2 * m_qk * e, bytes_fwd_bwd=5 * m_qk * e),
        dict(name="add_rms_norm", shape=[tokens, hidden], ops=(add_rms_norm, add_rms_norm_ref),
             inputs=lambda: [rnd(tokens, hidden), rnd(tokens, hidden), w_h], consts=[1e-6],
             grads=[rnd(tokens, hidden), rnd(tokens, hidden)], bytes_fwd=4 * m_h * e, bytes_fwd_bwd=8 * m_h * e),
        dict(name="rope", shape=[1, tokens, heads, kv_heads, head_dim], ops=(rope, rope_ref),
             inputs=lambda: [rnd(1, tokens, heads, head_dim), rnd(1, tokens, kv_heads, head_dim)],
             consts=[positions, cos, sin], grads=[rnd(1, tokens, heads, head_dim), rnd(1, tokens, kv_heads, head_dim)],
             bytes_fwd=2 * (m_q + m_k) * e, bytes_fwd_bwd=4 * (m_q + m_k) * e),
        dict(name="swiglu", shape=[tokens, inter], ops=(swiglu, swiglu_ref),
             inputs=lambda: [rnd(tokens, inter), rnd(tokens, inter)], consts=[], grads=[rnd(tokens, inter)],
             bytes_fwd=3 * m_i * e, bytes_fwd_bwd=8 * m_i * e),
    ]  # fmt: skip


def _measure(case: dict, impl: str, mode: str, fn: Callable, nbytes: int, no_grad: bool = False) -> dict:
    def run():
        if no_grad:
            with torch.no_grad():
                return fn()
        return fn()

    row = dict(kernel=case["name"], impl=impl, mode=mode, wall_ms=bench_ms(run))
    row["GBps_wall"] = nbytes / row["wall_ms"] / 1e6
    try:
        row["gpu_ms"] = graph_ms(run)
    except Exception as e:  # recorded; the wall-clock number stands alone then
        row["gpu_ms"], row["graph_error"] = None, repr(e)[:300]
        print(f"# {case['name']} {impl} {mode}: CUDA graph timing failed: {e!r}", file=sys.stderr, flush=True)
    row["ms"] = row["gpu_ms"] or row["wall_ms"]  # the number the targets use
    row["GBps"] = nbytes / row["ms"] / 1e6
    return row


def run_elementwise(case: dict, use_compile: bool) -> list[dict]:
    kernel, ref = case["ops"]
    impls = {"triton": kernel, "torch_eager": ref}
    if use_compile:
        impls["torch_compile"] = torch.compile(ref, dynamic=False)
    rows = []
    for impl, fn in impls.items():
        inputs = case["inputs"]()
        args = inputs + case["consts"]
        try:
            fwd = lambda fn=fn, args=args: fn(*args)  # noqa: E731
            rows.append(_measure(case, impl, "fwd", fwd, case["bytes_fwd"], no_grad=True))
            for t in inputs:
                t.requires_grad_(True)
            fwd_bwd = _fwd_bwd(lambda *a, fn=fn: fn(*a, *case["consts"]), inputs, case["grads"])
            rows.append(_measure(case, impl, "fwd+bwd", fwd_bwd, case["bytes_fwd_bwd"]))
        except Exception as e:  # recorded in the JSON (e.g. torch.compile failing), the other impls still run
            print(f"# {case['name']} {impl} failed: {e!r}", file=sys.stderr, flush=True)
            rows.append(dict(kernel=case["name"], impl=impl, mode="error", error=repr(e)[:500]))
    copy = copy_bandwidth("cuda" if CUDA else "cpu", case["bytes_fwd"] // 2)
    for r in rows:
        r["shape"] = case["shape"]
        r["copy_GBps_same_bytes"] = copy["GBps"]  # ceiling at this size: a copy moving the fwd's bytes
    return rows


def run_fused_ce(tokens: int, vocab: int, hidden: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(device, dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    out = {"tokens": tokens, "vocab": vocab, "hidden": hidden, "dtype": str(dtype)}
    for impl, fn in (
        ("fused_triton", linear_cross_entropy),
        ("logits_plus_F_cross_entropy", linear_cross_entropy_ref),
    ):
        step = lambda fn=fn: torch.autograd.grad(fn(h, w, targets), [h, w])  # noqa: E731
        with torch.no_grad():
            fwd_ms = bench_ms(lambda fn=fn: fn(h, w, targets))
        fwd_bwd_ms = bench_ms(step)
        peak = None
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        out[impl] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "peak_extra_bytes": peak}
        if peak is not None:
            out[impl]["peak_extra_GB"] = peak / 1e9
    return out


def run_sweeps(device: str, dtype: torch.dtype, small: bool = False) -> list[dict]:
    """GPU time of the RMSNorm and SwiGLU kernels alone under other launch configs than the heuristic's."""
    timer = graph_ms if CUDA else bench_ms
    t = 64 if small else 16384
    from llmray.kernels.rmsnorm import rms_norm_bwd, rms_norm_fwd
    from llmray.kernels.swiglu import swiglu_bwd, swiglu_fwd

    rows = []
    e = torch.tensor([], dtype=dtype).element_size()
    rms_configs = {
        (t, 1024): [(1, 2), (1, 4), (1, 8), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8), (8, 16)],
        (16 * t, 128): [(8, 2), (8, 4), (16, 4), (16, 8), (32, 4), (32, 8), (64, 8), (64, 16)],
    }
    if small:  # a dry run checks the plumbing: two configs of each sweep (the interpreter is slow)
        rms_configs = {k: v[:2] for k, v in rms_configs.items()}
    for (m, n), configs in rms_configs.items():
        x, dy = torch.randn(m, n, device=device, dtype=dtype), torch.randn(m, n, device=device, dtype=dtype)
        w = torch.ones(n, device=device, dtype=dtype)
        _, _, rstd = rms_norm_fwd(x, w, 1e-6)
        for cfg in configs:
            t_f = timer(lambda cfg=cfg, x=x, w=w: rms_norm_fwd(x, w, 1e-6, config=cfg))
            t_b = timer(lambda cfg=cfg, x=x, w=w, dy=dy, rstd=rstd: rms_norm_bwd(dy, x, w, rstd, config=cfg))
            rows.append(dict(kernel="rms_norm", shape=[m, n], block_m=cfg[0], num_warps=cfg[1],
                             fwd_gpu_ms=t_f, fwd_GBps=2 * m * n * e / t_f / 1e6,
                             bwd_gpu_ms=t_b, bwd_GBps=3 * m * n * e / t_b / 1e6))  # fmt: skip
    m, n = t, 3072
    g, u, dy = (torch.randn(m, n, device=device, dtype=dtype) for _ in range(3))
    for block, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8)][
        : 2 if small else None
    ]:
        t_f = timer(lambda b=block, nw=warps: swiglu_fwd(g, u, b, nw))
        t_b = timer(lambda b=block, nw=warps: swiglu_bwd(dy, g, u, b, nw))
        rows.append(dict(kernel="swiglu", shape=[m, n], block=block, num_warps=warps,
                         fwd_gpu_ms=t_f, fwd_GBps=3 * m * n * e / t_f / 1e6,
                         bwd_gpu_ms=t_b, bwd_GBps=5 * m * n * e / t_b / 1e6))  # fmt: skip
    return rows


def run_rms_bwd_programs(device: str, dtype: torch.dtype, small: bool = False) -> list[dict]:
    """GPU time of the RMSNorm backward kernel (dW partial sums included) by programs per SM."""
    from llmray.kernels.rmsnorm import rms_norm_bwd, rms_norm_fwd

    timer = graph_ms if CUDA else bench_ms
    t = 64 if small else 16384
    rows = []
    e = torch.tensor([], dtype=dtype).element_size()
    for n in (1024, 4096):
        x, dy = torch.randn(t, n, device=device, dtype=dtype), torch.randn(t, n, device=device, dtype=dtype)
        w = torch.ones(n, device=device, dtype=torch.float32)
        _, _, rstd = rms_norm_fwd(x, w, 1e-6)
        for per_sm in (2, 4, 8, 16):
            ms = timer(
                lambda x=x, w=w, dy=dy, rstd=rstd, k=per_sm: rms_norm_bwd(dy, x, w, rstd, programs_per_sm=k)
            )
            rows.append(dict(kernel="rms_norm_bwd", shape=[t, n], programs_per_sm=per_sm, bwd_gpu_ms=ms,
                             bwd_GBps=3 * t * n * e / ms / 1e6))  # fmt: skip
    return rows


def summarize(result: dict) -> dict:
    """The issue's targets, evaluated on this run's numbers."""
    # ceiling: the faster of the two timings of the 4 GB copy (inside a CUDA graph the copy is a memcpy
    # node, which ran slower than the same copy launched normally)
    copy = max(result["copy"]["GBps"], result["copy"].get("GBps_wall", 0.0))
    by = {(r["kernel"], r["impl"], r["mode"]): r for r in result["elementwise"] if r["mode"] != "error"}
    checks = []
    for kernel, mode in sorted({(k, m) for k, _, m in by}):
        t, c, e = (by.get((kernel, impl, mode)) for impl in ("triton", "torch_compile", "torch_eager"))
        if t is None or e is None:
            continue
        checks.append(dict(
            kernel=kernel, mode=mode, triton_GBps=round(t["GBps"], 1), frac_of_copy=round(t["GBps"] / copy, 3),
            frac_of_copy_same_bytes=round(t["GBps"] / t["copy_GBps_same_bytes"], 3),
            ge_80pct_copy=t["GBps"] >= 0.8 * copy,
            speedup_vs_compile=round(c["ms"] / t["ms"], 3) if c else None,
            not_slower_than_compile=(t["ms"] <= c["ms"]) if c else None,
            speedup_vs_eager=round(e["ms"] / t["ms"], 3),
        ))  # fmt: skip
    out = {"elementwise": checks}
    ce = result.get("fused_ce")
    if ce and ce["fused_triton"]["peak_extra_bytes"]:
        f, b = ce["fused_triton"], ce["logits_plus_F_cross_entropy"]
        out["fused_ce"] = dict(
            peak_memory_ratio=round(f["peak_extra_bytes"] / b["peak_extra_bytes"], 4),
            le_25pct_memory=f["peak_extra_bytes"] <= 0.25 * b["peak_extra_bytes"],
            fwd_bwd_speedup=round(b["fwd_bwd_ms"] / f["fwd_bwd_ms"], 3),
            equal_or_faster=f["fwd_bwd_ms"] <= b["fwd_bwd_ms"],
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"), "kernels.json"))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-sweep", action="store_true", help="skip the launch-config sweeps")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU allowed (checks the script only)")
    p.add_argument("--only", default="", help="comma-separated case names (e.g. rms_norm,rms_norm_4096)")
    args = p.parse_args(argv)
    if not CUDA and not args.dry_run:
        p.error("needs a CUDA GPU (use --dry-run with TRITON_INTERPRET=1 to check the script on CPU)")
    device, dtype = ("cuda" if CUDA else "cpu"), torch.bfloat16
    tokens = 64 if args.dry_run else args.tokens
    result: dict = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu (dry run: timings meaningless)",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": str(dtype),
        "tokens": tokens,
        "command": "python " + " ".join(sys.argv),
        "copy": copy_bandwidth(device, 1 << (20 if args.dry_run else 31)),
        "elementwise": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        result["targets"] = summarize(result) if result["elementwise"] else {}
        out.write_text(json.dumps(result, indent=1))

    only = [c for c in args.only.split(",") if c]
    for case in elementwise_cases(tokens, device, dtype, small=args.dry_run):
        if only and case["name"] not in only:
            continue
        t0 = time.perf_counter()
        result["elementwise"].extend(run_elementwise(case, use_compile=CUDA and not args.no_compile))
        print(f"# {case['name']}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        save()
    ce_shape = (64, 1000, 32) if args.dry_run else (8192, 151936, 1024)
    if not only or "fused_ce" in only:
        result["fused_ce"] = run_fused_ce(*ce_shape, device, dtype)
        save()
    if not only or "rms_norm" in only:
        result["rms_bwd_programs"] = run_rms_bwd_programs(device, dtype, small=args.dry_run)
        save()
    if not args.no_sweep:
        t0 = time.perf_counter()
        result["sweeps"] = run_sweeps(device, dtype, small=args.dry_run)
        print(f"# sweeps: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        save()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
