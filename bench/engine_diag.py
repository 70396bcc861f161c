"""Where a decode step's time goes on the GPU: host phases, GPU bubbles, syncs, decode-kernel configs.

    python bench/engine_diag.py --out DIR [--baseline CHECKOUT] [--sweep]   # one H200, ~80 s
    python bench/engine_diag.py --quick --out /tmp/d                        # tiny model on CPU: script check

- ``phases``: per ``step()`` call, host ms of schedule / launch (inputs + enqueue) / collect (the wait for
  the step read back) / the rest (postprocess), and on CUDA the GPU time between the ends of consecutive
  launches (``gpu_step_ms``) and the bubble before each launch (``gpu_gap_ms``: the GPU finished the
  previous step before the host started this one). Batch-256 decode steps (sync and async scheduling) and
  single-stream decode steps.
- ``syncs``: host syncs hit during a few async steps (``torch.cuda.set_sync_debug_mode``), by source line.
- ``profiler``: the CUDA runtime calls of a few async steps (torch.profiler), and a chrome trace.
- ``sweep``: the paged decode kernel alone per (BLOCK_N, num_warps, num_stages).
- ``--baseline``: the nano-vllm workload (one timed run) and single-stream TPOT of another checkout's
  ``llmray`` in a subprocess, next to this one's.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("LLMRAY_BENCH_SOURCE", str(REPO)))

from llmray.engine.sampling_params import SamplingParams  # noqa: E402

sys.path.insert(1, str(REPO / "bench"))
from engine import build_model, make_llm, stream_times, sync, timed_runs, workload  # noqa: E402
from engine_profile import drain_steps, step_timers  # noqa: E402

CUDA = torch.cuda.is_available()


def phases(engine, prompts, params, async_on: bool, keep) -> dict:
    """Host ms per phase and GPU ms per step over the ``step()`` calls whose batch passes ``keep``."""
    cur: dict = {}
    marks: list = []  # (start, end) events per launch, with the step's seqs and tokens
    try:
        with step_timers(engine, cur, marks):
            engine.async_scheduling = async_on
            for i, (p, s) in enumerate(zip(prompts, params, strict=True)):
                engine.add_request(f"diag-{async_on}-{i}-{time.monotonic_ns()}", p, s)
            rows = drain_steps(engine, cur)
            sync()
    finally:
        engine.async_scheduling = True
    keep_rows = [r for r in rows if "seqs" in r and keep(r["seqs"], r["tokens"])]
    n = max(1, len(keep_rows))
    res = {"steps": len(keep_rows)}
    for k in ("wall", "schedule", "launch", "collect"):
        res[f"{k}_ms"] = sum(r.get(k, 0.0) for r in keep_rows) / n * 1e3
    res["postprocess_ms"] = res["wall_ms"] - res["schedule_ms"] - res["launch_ms"] - res["collect_ms"]
    if CUDA:
        steps, gaps, inside = [], [], []
        for (ev0, _, _), (ev1, s1, t1) in zip(marks, marks[1:], strict=False):
            if keep(s1, t1):
                steps.append(ev0[1].elapsed_time(ev1[1]))
                gaps.append(max(0.0, ev0[1].elapsed_time(ev1[0])))
                inside.append(ev1[0].elapsed_time(ev1[1]))
        m = max(1, len(steps))
        res["gpu_step_ms"] = sum(steps) / m
        res["gpu_gap_ms"] = sum(gaps) / m
        res["gpu_launch_span_ms"] = sum(inside) / m
    return res


def find_syncs(engine, prompts, params, steps: int = 6) -> dict:
    """Synchronising CUDA calls during async steps, by the Python line that made them."""
    if not CUDA:
        return {}
    for i, (p, s) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"sync-{i}", p, s)
    for _ in range(3):
        engine.step()
    found: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            for _ in range(steps):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        found[f"{w.filename}:{w.lineno}: {str(w.message)[:120]}"] += 1
    while engine.has_unfinished():
        engine.step()
    return dict(found)


def profiler(engine, prompts, params, out_dir: Path, steps: int = 5) -> list:
    if not CUDA:
        return []
    from torch.profiler import ProfilerActivity, profile

    for i, (p, s) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"prof-{i}", p, s)
    for _ in range(4):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    while engine.has_unfinished():
        engine.step()
    trace = out_dir / "trace_async_decode.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, gzip.open(str(trace) + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    trace.unlink()
    rows = []
    for e in prof.key_averages():
        if e.key.startswith("cuda") or e.key.startswith("aten::") or "Sync" in e.key or "Memcpy" in e.key:
            rows.append([e.key, e.count, round(e.cpu_time_total / 1e3 / steps, 4)])
    rows.sort(key=lambda r: -r[2])
    return rows[:40]


def _bench(fn, args: tuple, conf: tuple) -> float:
    import triton

    return triton.testing.do_bench(lambda: fn(*args, conf), warmup=5, rep=20, return_mode="median")


def _decode(fn, args: tuple, kw: dict, ns: int, conf: tuple) -> torch.Tensor:
    return fn(*args, ns, config=conf, **kw)


def sweep(cfg) -> dict:
    from llmray.kernels.paged_attention import default_num_splits, paged_decode

    h, hkv, d, page = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    base, pf = (64, 4, 2), (32, 4, 1, True)
    cases = [
        (256, 843, torch.bfloat16, [(1, c) for c in (base, pf, (64, 4, 1, True), (32, 2, 1, True), (64, 8, 1, True))]
         + [(1, c) for c in ((32, 4, 2), (64, 4, 3), (128, 8, 2))] + [(2, base), (2, pf), (4, pf)]),
        (256, 843, torch.float8_e4m3fn, [(1, base), (1, pf), (1, (64, 4, 1, True)), (2, pf)]),
        (1, 800, torch.bfloat16, [(1, c) for c in (base, pf, (64, 4, 1, True), (32, 4, 2), (64, 4, 3))]),
    ]  # fmt: skip
    res = {}
    for bsz, ctx, kv_dtype, confs in cases:
        nblk = -(-ctx // page)
        q = torch.randn(bsz, h, d, device="cuda", dtype=torch.bfloat16)
        tables = torch.randperm(bsz * nblk, device="cuda").view(bsz, nblk).to(torch.int64)
        lens = torch.full((bsz,), ctx, device="cuda", dtype=torch.int64)
        kc = torch.randn(bsz * nblk, page, hkv, d, device="cuda").to(kv_dtype)
        vc = torch.randn(bsz * nblk, page, hkv, d, device="cuda").to(kv_dtype)
        one = torch.ones(1, device="cuda")
        splits = default_num_splits(bsz, hkv, sms)
        kw = dict(k_scale=one, v_scale=one)
        run = functools.partial(_decode, paged_decode, (q, kc, vc, tables, lens, d**-0.5), kw)
        ref = run(splits, base).float()
        for split_x, conf in confs:
            ns = splits * split_x
            name = f"bs{bsz} ctx{ctx} {str(kv_dtype)[6:]} splits{ns} {conf}"
            try:
                err = ((run(ns, conf).float() - ref).abs().max() / ref.abs().max()).item()
                ms = _bench(run, (ns,), conf)
                res[name] = ms if err < 2e-2 else f"{ms} WRONG (rel err {err:.3g})"
            except Exception as e:  # a config that does not compile: note it and go on
                res[name] = f"error {type(e).__name__}: {str(e)[:200]}"
            print(f"  sweep {name}: {res[name]}", flush=True)
        del kc, vc
    return res


def child(args) -> None:
    """Throughput (1 timed run) + single-stream TPOT of whatever ``llmray`` is first on the path."""
    model, cfg = build_model(args.quick)
    llm, startup = make_llm(model)
    prompts, outs = workload(args.num_seqs, args.min_len, args.max_len, cfg.vocab_size)
    res = {"llmray": str(Path(sys.modules["llmray"].__file__).parent), "startup_s": startup}
    res["nano_vllm_tok_s"] = timed_runs(llm, prompts, outs, args.runs, cfg.vocab_size)
    res["single_stream"] = single_stream(llm, cfg, args.quick)
    Path(args.json_out).write_text(json.dumps(res, indent=2))


def single_stream(llm, cfg, quick: bool) -> dict:
    import random

    rng = random.Random(2)
    plen, new = (512, 256) if not quick else (64, 32)
    greedy = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    stream_times(llm.engine, "warm", [rng.randrange(cfg.vocab_size) for _ in range(plen)], greedy)
    stamps = stream_times(llm.engine, "one", [rng.randrange(cfg.vocab_size) for _ in range(plen)], greedy)
    return {"tpot_ms": (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3, "ttft_ms": stamps[0] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/engine_diag")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--baseline-timeout", type=int, default=60)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-only", action="store_true", help="only the decode-kernel sweep")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.num_seqs, args.min_len, args.max_len = 12, 8, 48
    if args.child:
        return child(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep_only:
        from llmray.config import ModelConfig

        (out / "engine_sweep.json").write_text(json.dumps(sweep(ModelConfig.preset("qwen3-0.6b")), indent=2))
        return
    res: dict = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "command": " ".join(sys.argv)}

    def save():
        (out / "engine_diag.json").write_text(json.dumps(res, indent=2))

    model, cfg = build_model(args.quick)
    prompts, outs = workload(args.num_seqs, args.min_len, args.max_len, cfg.vocab_size)
    llm, res["startup_s"] = make_llm(model)
    print(f"{time.strftime('%X')} startup {res['startup_s']:.1f} s", flush=True)
    res["nano_vllm_tok_s"] = timed_runs(llm, prompts, outs, args.runs, cfg.vocab_size)
    res["sampler_fused"] = getattr(llm.engine.runner.sampler, "fused", None)
    save()
    engine = llm.engine
    cap = 8 if args.quick else 48
    params = [SamplingParams(max_tokens=min(o, cap), temperature=0.6, ignore_eos=True) for o in outs]
    big = lambda s, t: s == t and s >= min(200, args.num_seqs)  # noqa: E731
    for mode in (False, True):
        key = f"decode_bs256_{'async' if mode else 'sync'}"
        res[key] = phases(engine, prompts, params, mode, big)
        print(f"{time.strftime('%X')} {key}: {res[key]}", flush=True)
        save()
    one = [SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)]
    for mode in (False, True):
        key = f"decode_bs1_{'async' if mode else 'sync'}"
        res[key] = phases(engine, prompts[:1], one, mode, lambda s, t: s == t == 1)
        print(f"{time.strftime('%X')} {key}: {res[key]}", flush=True)
    res["single_stream"] = single_stream(llm, cfg, args.quick)
    print(f"{time.strftime('%X')} single stream {res['single_stream']}", flush=True)
    save()
    p16 = [SamplingParams(max_tokens=16, temperature=0.6, ignore_eos=True)] * len(prompts)
    res["syncs"] = find_syncs(engine, prompts, p16)
    print(f"{time.strftime('%X')} syncs {json.dumps(res['syncs'], indent=1)}", flush=True)
    save()
    res["profiler"] = profiler(engine, prompts, p16, out)
    print(f"{time.strftime('%X')} profiler top: {json.dumps(res['profiler'][:25], indent=0)}", flush=True)
    save()
    del llm, engine
    if CUDA and args.sweep:
        res["sweep"] = sweep(cfg)
        save()
    if args.baseline:
        del model
        if CUDA:
            torch.cuda.empty_cache()
        child_json = out / "_baseline.json"
        cmd = [sys.executable, __file__, "--child", "--json-out", str(child_json), "--runs", str(args.runs)]
        cmd += [
            "--num-seqs",
            str(args.num_seqs),
            "--min-len",
            str(args.min_len),
            "--max-len",
            str(args.max_len),
        ]
        cmd += ["--quick"] if args.quick else []
        base = str(Path(args.baseline).resolve())
        env = dict(
            os.environ,
            LLMRAY_BENCH_SOURCE=base,
            PYTHONPATH=base + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.baseline_timeout, capture_output=True, text=True)
            res["baseline"] = (
                json.loads(child_json.read_text()) if proc.returncode == 0 else {"error": proc.stderr[-3000:]}
            )
        except subprocess.TimeoutExpired:
            res["baseline"] = {"error": f"did not finish within {args.baseline_timeout} s"}
        print(f"{time.strftime('%X')} baseline {res['baseline']}", flush=True)
        save()
    print(json.dumps({k: v for k, v in res.items() if k != "profiler"}, indent=1))


if __name__ == "__main__":
    main()
