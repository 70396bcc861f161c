"""The engine's figures: throughput from the first run, fp8 KV, single-stream TPOT, prefix hits, profile.

    python bench/engine.py --out bench/results [--baseline .data/baseline]   # one H200, ~3 minutes
    python bench/engine.py --quick --out /tmp/b                              # tiny model on CPU: script check

As a new user would: Qwen3-0.6B shapes with random bf16 weights, ``LLM(...)`` (which compiles and captures
everything it will use before returning), one small warm-up ``generate``, then timed runs.
- nano-vllm workload: 256 sequences, prompt and output lengths U[100, 1024] (seed 0), temperature 0.6,
  ignore_eos; three consecutive runs with bf16 KV, then three with fp8 KV -> output tokens/s.
- single stream: 512-token prompt, 256 greedy tokens -> TPOT (mean ms between tokens) and TTFT.
- prefix hit: TTFT of a 2,048-token prompt after one sharing its first 2,000 tokens, over a cold one.
- profile (engine_profile.json): per step, host ms (schedule, launch = inputs + enqueue, postprocess) and
  device ms (CUDA events around the step's work) with synchronous scheduling, plus the step wall time
  with async scheduling, for batch-256 decode steps and mixed steps; ``--baseline DIR`` runs the same
  profile (and two workload runs) on another checkout's ``llmray`` in a subprocess: before vs after.
Writes engine.json and engine_profile.json after every section; ``--trace``: engine_trace.json, what each
bf16 run paid (prefill vs decode phase, Triton compiles, GC, allocator growth; bench/engine_trace.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("LLMRAY_BENCH_SOURCE", str(REPO)))  # a baseline checkout, for --baseline

from llmray.config import ModelConfig  # noqa: E402
from llmray.engine.llm import LLM  # noqa: E402
from llmray.engine.sampling_params import SamplingParams  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (the bench modules below, whatever the cwd)
from engine_common import stream_times, sync  # noqa: E402
from engine_profile import decode_kernel_ms, profile  # noqa: E402


def build_model(quick: bool):
    from llmray.model.qwen3 import Qwen3ForCausalLM

    cfg = (
        ModelConfig.preset("tiny", max_position_embeddings=4096)
        if quick
        else ModelConfig.preset("qwen3-0.6b")
    )
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen3ForCausalLM(cfg)
    return model.to(torch.bfloat16 if cuda else torch.float32).eval(), cfg


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    outs = [rng.randint(lo, hi) for _ in range(n)]
    return prompts, outs


def make_llm(model, **kw) -> tuple[LLM, float]:
    sync()
    t = time.perf_counter()
    llm = LLM.from_model(model, max_num_seqs=256, max_num_batched_tokens=8192, **kw)
    sync()
    return llm, time.perf_counter() - t


def timed_runs(llm, prompts, outs, runs: int, vocab: int, tracer=None) -> list[float]:
    """Output tok/s of each run; ``tracer`` (engine_trace.RunTracer): what each run paid (steps, compiles)."""
    # what a new user does once: one small generate
    llm.generate(workload(4, 16, 64, vocab, seed=1)[0], SamplingParams(max_tokens=8, ignore_eos=True))
    sp = [SamplingParams(max_tokens=o, temperature=0.6, ignore_eos=True) for o in outs]
    rates = []
    for i in range(runs):
        sync()
        t = time.perf_counter()
        if tracer is not None:
            with tracer.run(f"run {i + 1}"):
                llm.generate(prompts, sp)
        else:
            llm.generate(prompts, sp)
        sync()
        rates.append(sum(outs) / (time.perf_counter() - t))
        print(f"  run {len(rates)}: {rates[-1]:.0f} output tok/s", flush=True)
    return rates


def latency(llm, vocab: int, quick: bool) -> dict:
    engine = llm.engine
    rng = random.Random(2)
    rand = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    plen, new = (512, 256) if not quick else (64, 32)
    greedy = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    stream_times(engine, "warm", rand(plen), greedy)
    stamps = stream_times(engine, "single", rand(plen), greedy)
    res = {
        "single_stream_tpot_ms": (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3,
        "single_stream_ttft_ms": stamps[0] * 1e3,
    }
    cold_len, shared = (2048, 2000) if not quick else (256, 240)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    colds, hits = [], []
    for attempt in range(3):  # the first round is a warm-up for the shapes; the median of the rest
        a = rand(cold_len)
        colds.append(stream_times(engine, f"cold{attempt}", a, one)[0] * 1e3)
        hits.append(stream_times(engine, f"hit{attempt}", a[:shared] + rand(cold_len - shared), one)[0] * 1e3)
    cold, hit = sorted(colds[1:])[0], sorted(hits[1:])[0]
    res["prefix"] = {
        "prompt_tokens": cold_len,
        "shared_tokens": shared,
        "cold_ttft_ms": cold,
        "hit_ttft_ms": hit,
    }
    res["prefix_hit_over_cold"] = hit / cold
    return res


def apply_decode_config(path: str) -> dict:
    """Set the decode kernel's launch configs to the best of a ``bench/decode_sweep.py`` run (this process)."""
    from llmray.kernels import paged_attention as pa

    best = json.loads(Path(path).read_text()).get("best", {})
    if "bf16" in best:
        pa.DECODE_CONFIG[torch.bfloat16] = tuple(best["bf16"]["config"])
        pa.DECODE_SPLIT_MULT[False] = best["bf16"]["split_mult"]
    if "fp8" in best:
        pa.DECODE_CONFIG_FP8 = tuple(best["fp8"]["config"])
        pa.DECODE_SPLIT_MULT[True] = best["fp8"]["split_mult"]
    if "bs1" in best:
        pa.DECODE_CONFIG_SMALL = tuple(best["bs1"]["config"])
    applied = {k: pa.__dict__[k] for k in ("DECODE_CONFIG_FP8", "DECODE_CONFIG_SMALL", "DECODE_SPLIT_MULT")}
    applied["DECODE_CONFIG_bf16"] = pa.DECODE_CONFIG[torch.bfloat16]
    print("decode configs:", applied, flush=True)
    return {
        k: v if not isinstance(v, dict) else {str(a): b for a, b in v.items()} for k, v in applied.items()
    }


def profile_child(args) -> None:
    """``--profile-only``: the profile and two workload runs of whatever ``llmray`` is first on the path."""
    model, cfg = build_model(args.quick)
    llm, startup = make_llm(model)
    prompts, outs = workload(args.num_seqs, args.min_len, args.max_len, cfg.vocab_size)
    res = {"llmray": str(Path(sys.modules["llmray"].__file__).parent), "startup_s": startup}
    res["nano_vllm_tok_s"] = timed_runs(llm, prompts, outs, args.runs, cfg.vocab_size)
    res["profile"] = profile(llm, prompts, [min(o, args.profile_tokens) for o in outs])
    Path(args.json_out).write_text(json.dumps(res, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--quick", action="store_true", help="tiny model and workload (CPU check of the script)")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--profile-tokens", type=int, default=64, help="output tokens per sequence when profiling"
    )
    ap.add_argument("--baseline", default=None, help="a checkout holding the llmray package to compare with")
    ap.add_argument("--baseline-timeout", type=int, default=150)
    ap.add_argument("--baseline-runs", type=int, default=2, help="timed workload runs of the baseline")
    ap.add_argument("--decode-config", default=None, help="decode_sweep.json: run with its best configs")
    ap.add_argument("--skip-profile", action="store_true", help="no decode-kernel timing or step profile")
    ap.add_argument("--unfused-qk", action="store_true", help="q/k norms + rope as three launches")
    ap.add_argument("--no-fp8", action="store_true", help="bf16 KV runs only")
    ap.add_argument("--fp8-only", action="store_true", help="fp8 KV runs only (no latency section)")
    ap.add_argument(
        "--ab-graph-tokens",
        type=int,
        default=None,
        help="then a bf16 engine with this max_graph_tokens (--ab-runs runs): ab_graph<N>_tok_s",
    )
    ap.add_argument("--ab-runs", type=int, default=1)
    ap.add_argument(
        "--ab-prefill-splits",
        type=int,
        default=1,
        help="the A/B engine's prefill split-K for small steps (1: none, the engine before it); its latency too",
    )
    ap.add_argument("--trace", action="store_true", help="engine_trace.json: what each bf16 run paid")
    ap.add_argument("--no-plot", action="store_true", help="no engine.png")
    ap.add_argument(
        "--max-graph-tokens",
        type=int,
        default=None,
        help="engine option: mixed steps up to this replay graphs",
    )
    ap.add_argument("--profile-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.num_seqs, args.min_len, args.max_len, args.profile_tokens = 12, 8, 48, 8
    if args.profile_only:
        return profile_child(args)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    applied = apply_decode_config(args.decode_config) if args.decode_config else None
    if args.unfused_qk:  # the op set without the fused q/k norm + rope kernel (before the model resolves it)
        from llmray.model import ops as model_ops

        base_ops = model_ops.triton_ops()
        model_ops.triton_ops = lambda: dataclasses.replace(base_ops, qk_norm_rope=None)  # type: ignore
    model, cfg = build_model(args.quick)
    prompts, outs = workload(args.num_seqs, args.min_len, args.max_len, cfg.vocab_size)
    res: dict = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "model": "qwen3-0.6b shapes, random bf16 weights" if not args.quick else "tiny preset (script check)",
        "workload": f"{args.num_seqs} seqs, prompt/output U[{args.min_len}, {args.max_len}], seed 0, T=0.6",
    }
    if applied:
        res["decode_config"] = applied
    res["fused_qk_norm_rope"] = not args.unfused_qk
    if args.max_graph_tokens:
        res["max_graph_tokens"] = args.max_graph_tokens
    prof: dict = {"command": res["command"], "device": res["device"]}

    def save():
        (out_dir / "engine.json").write_text(json.dumps(res, indent=2))
        (out_dir / "engine_profile.json").write_text(json.dumps(prof, indent=2))

    engines = [("nano_vllm_tok_s", "auto", args.max_graph_tokens, args.runs)] * (not args.fp8_only)
    engines += [("nano_vllm_fp8_tok_s", "fp8", args.max_graph_tokens, args.runs)] * (not args.no_fp8)
    if args.ab_graph_tokens is not None:  # the same bf16 engine with another max_graph_tokens, after
        engines.append((f"ab_graph{args.ab_graph_tokens}_tok_s", "auto", args.ab_graph_tokens, args.ab_runs))
    from llmray.engine import runner as runner_mod

    splits0 = runner_mod.PREFILL_SPLITS
    for key, kv, graph_tokens, runs in engines:
        print(f"{key}:", flush=True)
        graph_kw = {"max_graph_tokens": graph_tokens} if graph_tokens is not None else {}
        ab = key.startswith("ab_")
        runner_mod.PREFILL_SPLITS = args.ab_prefill_splits if ab else splits0  # (read by ModelRunner())
        llm, startup = make_llm(model, kv_cache_dtype=kv, **graph_kw)
        tracer = None
        trace_file = {"nano_vllm_tok_s": "engine_trace.json", "nano_vllm_fp8_tok_s": "engine_trace_fp8.json"}
        if args.trace and key in trace_file:
            from engine_trace import RunTracer, prefill_step_kernels

            tracer = RunTracer(llm.engine)
        res[key] = timed_runs(llm, prompts, outs, runs, cfg.vocab_size, tracer)
        if tracer is not None:
            trace = {"device": res["device"], "warmup_s": getattr(llm.engine.runner, "warmup_s", None)}
            trace |= {"startup_s": startup, "runs": tracer.runs}
            (out_dir / trace_file[key]).write_text(json.dumps(trace, indent=2))
        r = llm.engine.runner
        res[f"{key.replace('_tok_s', '')}_startup_s"] = startup
        res[f"{key.replace('_tok_s', '')}_kv_blocks"] = r.num_blocks
        res[f"{key.replace('_tok_s', '')}_max_graph_tokens"] = r.config.max_graph_tokens
        if ab:  # the A/B engine's TPOT and prefix hit too
            res[f"{key.replace('_tok_s', '')}_prefill_splits"] = r.prefill_splits
            res[f"{key.replace('_tok_s', '')}_latency"] = latency(llm, cfg.vocab_size, args.quick)
        if key == "nano_vllm_tok_s":
            res["nano_vllm_prefill_splits"] = r.prefill_splits
            res["first_over_third"] = res[key][0] / res[key][-1]
            save()  # the runs first: a time limit may cut what follows
            res.update(latency(llm, cfg.vocab_size, args.quick))
            save()
            if tracer is not None and not args.skip_profile:  # a fresh full-budget prefill step's kernels
                budget = 8192 if not args.quick else 64
                trace["prefill_step"] = prefill_step_kernels(llm, cfg.vocab_size, budget, 16 if cuda else 4)
                (out_dir / "engine_trace.json").write_text(json.dumps(trace, indent=2))
            if cuda and not args.skip_profile:
                prof["decode_kernel_ms_bs256_ctx843"] = decode_kernel_ms(cfg)
                prof["after"] = profile(llm, prompts, [min(o, args.profile_tokens) for o in outs])
                prof["after"]["warmup_s"] = getattr(r, "warmup_s", None)
        save()
        del llm, r, tracer  # (the tracer holds the engine)
        gc.collect()  # the runner and its graphs reference each other
        if cuda:
            torch.cuda.empty_cache()
    save()
    if not args.no_plot and "nano_vllm_tok_s" in res:
        try:  # engine.png from these figures
            from engine_plot import plot

            plot(res, out_dir / "engine.png")
        except Exception as e:  # no matplotlib on the machine: the JSON is what counts
            print(f"engine.png not drawn: {e!r}", flush=True)
    if args.baseline:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        child = out_dir / "_baseline.json"
        cmd = [sys.executable, __file__, "--profile-only", "--json-out", str(child)]
        cmd += ["--runs", str(args.baseline_runs)]
        cmd += [
            "--num-seqs",
            str(args.num_seqs),
            "--min-len",
            str(args.min_len),
            "--max-len",
            str(args.max_len),
        ]
        cmd += ["--profile-tokens", str(args.profile_tokens)] + (["--quick"] if args.quick else [])
        env = dict(os.environ, LLMRAY_BENCH_SOURCE=str(Path(args.baseline).resolve()))
        env["PYTHONPATH"] = str(Path(args.baseline).resolve()) + os.pathsep + env.get("PYTHONPATH", "")
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.baseline_timeout, capture_output=True, text=True)
            if proc.returncode == 0 and child.exists():
                prof["before"] = json.loads(child.read_text())
                child.unlink()
            else:
                prof["before"] = {"error": proc.stderr[-3000:]}
        except subprocess.TimeoutExpired:
            prof["before"] = {"error": f"did not finish within {args.baseline_timeout} s"}
        save()
    print(json.dumps(res, indent=2))
    print(json.dumps(prof, indent=2))


if __name__ == "__main__":
    main()
