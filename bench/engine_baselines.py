"""The engine next to HF transformers and no-cache/contiguous-cache baselines (issue 17's figures: engine.py).

    python bench/engine_baselines.py --out DIR            # on a GPU (about 5 minutes); writes DIR/engine.json
    python bench/engine_baselines.py --quick --out /tmp/b # tiny model on CPU: checks the script only

Workload: Qwen3-0.6B shapes, random bf16 weights, 256 sequences with prompt and output lengths uniform in
[100, 1024] (seed 0), ignore_eos, temperature 0.6 -> output tokens/s, peak memory, KV actually used.
Also: paged-decode kernel KV bandwidth; HF ``generate`` (dynamic cache; static cache + compile) on a
32-sequence subset (left-padded, outputs capped at --hf-max-new, counting only requested tokens) next to
the engine on the same subset; single-stream decode ms/token (512 in, 256 new) for the engine and the
reference ``generate`` without and with a contiguous KV cache; TTFT of a 1024-token prompt and of a second
request sharing a 1000-token prefix. Writes engine.json (after every section) and engine.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmray.config import ModelConfig  # noqa: E402


def model_config(quick: bool) -> ModelConfig:
    if quick:
        return ModelConfig.preset("tiny", max_position_embeddings=4096)
    return ModelConfig.preset("qwen3-0.6b")


def build_model(cfg: ModelConfig, device: str, dtype: torch.dtype, kernels: str):
    from llmray.model.qwen3 import Qwen3ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg, kernels=kernels)
    return model.to(dtype).eval()


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    outs = [rng.randint(lo, hi) for _ in range(n)]
    return prompts, outs


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepProfiler:
    """Host wall time per engine step: scheduling, launching (inputs + enqueue), waiting for the device
    (``collect``: the host sync), and the rest (postprocessing). With async scheduling the next step is
    launched before the current one is collected, so the wait is what the host overlap could not hide."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.rows: list[dict] = []
        self.saved = (engine.scheduler.schedule, engine.runner.launch, engine.runner.collect, engine.step)
        sched, launch, collect, step = self.saved
        cur: dict = {}

        def timed(name, fn):
            def wrapper(*a):
                t = time.perf_counter()
                r = fn(*a)
                cur[name] = cur.get(name, 0.0) + time.perf_counter() - t
                if name == "schedule":
                    cur["seqs"], cur["tokens"] = len(r.scheduled), r.num_tokens
                return r

            return wrapper

        def step_():
            t = time.perf_counter()
            cur.clear()
            r = step()
            cur["total"] = time.perf_counter() - t
            self.rows.append(dict(cur))
            return r

        engine.scheduler.schedule = timed("schedule", sched)
        engine.runner.launch = timed("launch", launch)
        engine.runner.collect = timed("collect", collect)
        engine.step = step_

    def restore(self) -> None:
        e = self.engine
        e.scheduler.schedule, e.runner.launch, e.runner.collect, e.step = self.saved

    def summary(self) -> dict:
        rows = self.rows
        big = [r for r in rows if r.get("seqs", 0) >= 200 and r.get("seqs") == r.get("tokens")]

        def tot(k, rs=rows):
            return sum(r.get(k, 0.0) for r in rs)

        def mean_ms(k):
            return tot(k, big) / len(big) * 1e3 if big else None

        return {
            "steps": len(rows),
            "wall_s": tot("total"),
            "schedule_s": tot("schedule"),
            "launch_s (inputs + enqueue, host)": tot("launch"),
            "collect_s (waiting for the device)": tot("collect"),
            "postprocess_s": tot("total") - tot("schedule") - tot("launch") - tot("collect"),
            "decode_steps_bs200+": len(big),
            "mean_step_ms_bs200+": mean_ms("total"),
            "mean_schedule_ms_bs200+": mean_ms("schedule"),
            "mean_launch_ms_bs200+": mean_ms("launch"),
            "mean_collect_ms_bs200+": mean_ms("collect"),
        }


@torch.inference_mode()  # the graph's static input buffers are inference tensors
def graph_step_time(engine, prompts, outs) -> dict:
    """Device time of one 256-sequence decode step (graph replay) at the workload's mean context."""
    import triton

    r = engine.runner
    ctx = (sum(map(len, prompts)) + sum(outs) // 2) // len(prompts)
    nblk = -(-ctx // r.block_size)
    r._g_tables[:256, :nblk] = (
        torch.arange(256 * nblk, device="cuda", dtype=torch.int32).view(256, nblk) % r.num_blocks
    )
    r._g_ctx[:256] = ctx
    r._g_slots[:256] = -1
    graph = r.graphs[256][0]
    return {
        "gpu_ms_decode_step_bs256_graph": triton.testing.do_bench(graph.replay),
        "decode_step_context": ctx,
    }


def timed_generate(llm, prompts, params) -> float:
    sync()
    t = time.perf_counter()
    llm.generate(prompts, params)
    sync()
    return time.perf_counter() - t


def stream_times(engine, rid: str, prompt: list[int], params) -> list[float]:
    """Seconds from submission to each output of request ``rid`` (engine alone in the loop)."""
    engine.stream_outputs = True
    sync()
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, params)
    stamps = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                stamps.append(time.perf_counter() - t0)
    return stamps


def decode_kernel_bandwidth(cfg: ModelConfig, dtype: torch.dtype) -> list[dict]:
    import triton

    from llmray.kernels.paged_attention import default_num_splits, paged_decode

    rows = []
    h, hkv, d, page = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 16
    for bsz, ctx in [(256, 843), (64, 2048), (1, 4096), (1, 32768)]:
        nblk = -(-ctx // page)
        kc = torch.randn(bsz * nblk, page, hkv, d, device="cuda", dtype=dtype)
        vc = torch.randn_like(kc)
        tables = torch.randperm(bsz * nblk, device="cuda").to(torch.int32).view(bsz, nblk)
        lens = torch.full((bsz,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(bsz, h, d, device="cuda", dtype=dtype)
        moved = 2 * bsz * ctx * hkv * d * kc.element_size()
        for splits in sorted({1, default_num_splits(bsz, hkv)}):
            args = (q, kc, vc, tables, lens, d**-0.5)
            ms = triton.testing.do_bench(lambda a=args, s=splits: paged_decode(*a, num_splits=s))
            rows.append(
                {"batch": bsz, "context": ctx, "num_splits": splits, "ms": ms, "GB_per_s": moved / ms / 1e6}
            )
        del kc, vc
    return rows


def hf_child(args) -> None:
    """Runs in a subprocess (bounded by a timeout): HF transformers generate on the subset."""
    from transformers import Qwen3Config
    from transformers import Qwen3ForCausalLM as HFQwen3

    from llmray.model.checkpoint import hf_config_dict

    cfg = model_config(args.quick)
    hf_cfg = Qwen3Config(
        **{k: v for k, v in hf_config_dict(cfg, torch.bfloat16).items() if k != "torch_dtype"}
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = HFQwen3(hf_cfg).to(dtype).eval()
    prompts, outs = subset(args, cfg)
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    new = max(outs)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    if args.hf == "static":
        kw["cache_implementation"] = "static"
        warm = dict(kw)  # same shapes as the timed run, so compilation happens here
    else:
        warm = dict(kw, max_new_tokens=2, min_new_tokens=2)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, **warm)
        sync()
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, **kw)
        sync()
        dt = time.perf_counter() - t
    Path(args.hf_out).write_text(
        json.dumps({"seconds": dt, "requested_tokens": sum(outs), "tok_per_s": sum(outs) / dt})
    )


def subset(args, cfg):
    prompts, outs = workload(args.num_seqs, args.min_len, args.max_len, cfg.vocab_size)
    n = args.hf_seqs
    return prompts[:n], [min(o, args.hf_max_new) for o in outs[:n]]


def run_hf(args, mode: str, timeout: int) -> dict:
    out = Path(args.out) / f"_hf_{mode}.json"
    cmd = [sys.executable, __file__, "--hf", mode, "--hf-out", str(out), "--num-seqs", str(args.num_seqs)]
    cmd += ["--min-len", str(args.min_len), "--max-len", str(args.max_len), "--hf-seqs", str(args.hf_seqs)]
    cmd += ["--hf-max-new", str(args.hf_max_new)] + (["--quick"] if args.quick else [])
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout} s (time bound of this bench)"}
    if proc.returncode != 0 or not out.exists():
        return {"error": proc.stderr[-2000:]}
    return json.loads(out.read_text())


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    thr = {
        "llmray\n256-seq workload": res.get("workload", {}).get("output_tok_per_s"),
        "llmray\n32-seq subset": res.get("subset", {}).get("llmray_tok_per_s"),
        "HF dynamic\n32-seq subset": res.get("subset", {}).get("hf_dynamic", {}).get("tok_per_s"),
        "HF static+compile\n32-seq subset": res.get("subset", {})
        .get("hf_static_compile", {})
        .get("tok_per_s"),
    }
    thr = {k: v for k, v in thr.items() if v}
    a.bar(list(thr), list(thr.values()), color=["C0", "C0", "C1", "C1"][: len(thr)])
    a.set_ylabel("output tokens / s")
    a.set_title("Throughput (Qwen3-0.6B shapes, random bf16 weights)")
    a.tick_params(axis="x", labelsize=8)
    ss = res.get("single_stream", {})
    lat = {
        "no KV cache\n(reference)": ss.get("no_cache_ms_per_token"),
        "contiguous cache\n(reference)": ss.get("contiguous_cache_ms_per_token"),
        "llmray paged\n+ CUDA graphs": ss.get("llmray_ms_per_token"),
    }
    lat = {k: v for k, v in lat.items() if v}
    b.bar(list(lat), list(lat.values()), color=["C2", "C2", "C0"][: len(lat)])
    b.set_yscale("log")
    b.set_ylabel("ms per output token (log)")
    b.set_title("Single stream: 512-token prompt, 256 new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def bins(rows: list[dict]) -> dict:
    """Per-step host timings grouped by batch size (decode-only steps) plus the mixed prefill steps."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "seqs" not in r:
            continue
        if r["seqs"] != r["tokens"]:
            key = "mixed"
        else:
            key = next(f"bs<={hi}" for hi in (8, 32, 64, 128, 199, 256) if r["seqs"] <= hi)
        groups.setdefault(key, []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {"steps": len(rs)} | {
            f"mean_{k}_ms": sum(r.get(k, 0.0) for r in rs) / len(rs) * 1e3
            for k in ("total", "schedule", "launch", "collect")
        }
    return out


def profile_main(args) -> None:
    """Sync vs async scheduling on the workload (host timings by batch size) + torch.profiler tables."""
    from torch.profiler import ProfilerActivity, profile

    from llmray.engine.llm import LLM
    from llmray.engine.sampling_params import SamplingParams

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args.quick)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = build_model(cfg, device, dtype, args.kernels)
    llm = LLM.from_model(model, kernels=args.kernels, max_num_seqs=256, max_num_batched_tokens=8192)
    engine = llm.engine
    prompts, outs = workload(args.num_seqs, args.min_len, args.max_len, cfg.vocab_size)
    sp = [SamplingParams(max_tokens=o, temperature=0.6, ignore_eos=True) for o in outs]
    llm.generate(
        workload(8, 16, 64, cfg.vocab_size, seed=1)[0], SamplingParams(max_tokens=16, ignore_eos=True)
    )
    res: dict = {"command": "python " + " ".join(sys.argv)}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    tables = []
    for key, overlap, pinned in (
        ("sync", False, True),
        ("async", True, True),
        ("async_pageable", True, False),
    ):
        engine.async_scheduling = overlap
        engine.runner.sampler.pin_memory = pinned
        prof = StepProfiler(engine)
        dt = timed_generate(llm, prompts, sp)
        prof.restore()
        res[key] = {"seconds": dt, "output_tok_per_s": sum(outs) / dt, "by_batch": bins(prof.rows)}
        (out_dir / "engine_profile.json").write_text(json.dumps(res, indent=2))
        # torch.profiler over a few decode steps at batch 96 (after the prefill steps)
        for i in range(min(96, len(prompts))):
            engine.add_request(f"p{key}{i}", prompts[i], SamplingParams(max_tokens=40, ignore_eos=True))
        for _ in range(12):
            engine.step()
        with profile(activities=acts) as p:
            for _ in range(5):
                engine.step()
        sync()
        while engine.has_unfinished():
            engine.step()
        tables.append(f"=== {key}: 5 decode steps at batch 96 ===\n")
        tables.append(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    engine.stream_outputs = True
    stream_times(engine, "w", prompts[0][:1000], SamplingParams(max_tokens=1))
    with profile(activities=acts) as p:
        stream_times(engine, "t", prompts[1][:1000] + prompts[2][:24], SamplingParams(max_tokens=1))
    tables.append("=== one eager prefill step (1024 tokens) ===\n")
    tables.append(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    (out_dir / "engine_profile.txt").write_text("\n".join(tables))
    print(json.dumps(res, indent=2))
    print("\n".join(tables))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--quick", action="store_true", help="tiny model and workload (CPU check of the script)")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--hf-seqs", type=int, default=32)
    ap.add_argument("--hf-max-new", type=int, default=256, help="HF subset outputs capped here (time bound)")
    ap.add_argument("--hf-timeout", type=int, default=150)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--profile", action="store_true", help="sync vs async scheduling + torch.profiler tables")
    ap.add_argument("--hf", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.num_seqs, args.min_len, args.max_len, args.hf_seqs, args.hf_max_new = 16, 8, 48, 4, 16
    if args.hf:
        return hf_child(args)
    if args.profile:
        return profile_main(args)

    from llmray.engine.llm import LLM
    from llmray.engine.sampling_params import SamplingParams
    from llmray.model.generate import generate

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg = model_config(args.quick)
    res: dict = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "model": "qwen3-0.6b shapes, random weights" if not args.quick else "tiny preset",
        "dtype": str(dtype),
    }
    json_path = out_dir / "engine.json"

    def save():
        json_path.write_text(json.dumps(res, indent=2))

    model = build_model(cfg, device, dtype, args.kernels)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    if cuda:
        res["decode_kernel"] = decode_kernel_bandwidth(cfg, dtype)
        save()
        torch.cuda.reset_peak_memory_stats()

    # --- the 256-sequence workload ------------------------------------------------------------------
    t = time.perf_counter()
    llm = LLM.from_model(model, kernels=args.kernels, max_num_seqs=256, max_num_batched_tokens=8192)
    startup = time.perf_counter() - t
    engine = llm.engine
    prompts, outs = workload(args.num_seqs, args.min_len, args.max_len, cfg.vocab_size)
    sp = [SamplingParams(max_tokens=o, temperature=0.6, ignore_eos=True) for o in outs]
    # warm-up with full-size mixed steps too: Triton specialises kernels on argument values (e.g. strides
    # divisible by 16), and compiling those inside the timed run cost ~0.5 s per first-seen variant
    warm = (
        workload(8, 16, 64, cfg.vocab_size, seed=1)[0]
        + workload(48, args.min_len, args.max_len, cfg.vocab_size, 3)[0]
    )
    llm.generate(warm, SamplingParams(max_tokens=24, temperature=0.6, ignore_eos=True))
    prof = StepProfiler(engine)
    dt = timed_generate(llm, prompts, sp)
    res["workload"] = {
        "num_seqs": args.num_seqs,
        "prompt_tokens": sum(map(len, prompts)),
        "output_tokens": sum(outs),
        "seconds": dt,
        "output_tok_per_s": sum(outs) / dt,
        "total_tok_per_s": (sum(outs) + sum(map(len, prompts))) / dt,
        "engine_startup_s (KV sizing + CUDA graph capture)": startup,
        "kv_blocks": engine.runner.num_blocks,
        "kv_cache_gb_reserved": engine.runner.num_blocks * engine.runner.block_bytes / 1e9,
        "kv_cache_gb_peak_used": engine.peak_blocks_used * engine.runner.block_bytes / 1e9,
        "contiguous_cache_gb_needed (256 x 2048 tokens)": args.num_seqs
        * (2 * args.max_len)
        * engine.runner.block_bytes
        / engine.runner.block_size
        / 1e9,
        "weights_gb": weights_gb,
        "peak_memory_allocated_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "num_preemptions": engine.scheduler.num_preemptions,
        "profile": prof.summary(),
    }
    prof.restore()
    save()
    if cuda and 256 in engine.runner.graphs:
        res["workload"]["profile"].update(graph_step_time(engine, prompts, outs))
        save()

    # --- the engine on the HF subset ------------------------------------------------------------------
    sub_prompts, sub_outs = subset(args, cfg)
    dt = timed_generate(
        llm, sub_prompts, [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in sub_outs]
    )
    res["subset"] = {
        "num_seqs": len(sub_prompts),
        "output_cap": args.hf_max_new,
        "requested_tokens": sum(sub_outs),
        "llmray_tok_per_s": sum(sub_outs) / dt,
    }
    save()

    # --- single stream and TTFT -------------------------------------------------------------------------
    rng = random.Random(2)
    rand = lambda n: [rng.randrange(cfg.vocab_size) for _ in range(n)]  # noqa: E731
    long_prompt, n_new = (512, 256) if not args.quick else (64, 32)
    greedy = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    stream_times(engine, "warm", rand(long_prompt), greedy)
    stamps = stream_times(engine, "single", rand(long_prompt), greedy)
    ss = {
        "prompt": long_prompt,
        "new_tokens": n_new,
        "llmray_ms_per_token": (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3,
    }
    cold, hit = (1024, 1000) if not args.quick else (128, 120)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ttft = {}
    for attempt in range(2):  # the first round warms up the shapes
        a = rand(cold)
        ttft["cold_ms"] = stream_times(engine, f"cold{attempt}", a, one)[0] * 1e3
        ttft["prefix_hit_ms"] = (
            stream_times(engine, f"hit{attempt}", a[:hit] + rand(cold - hit), one)[0] * 1e3
        )
    ttft["prompt_tokens"], ttft["shared_prefix_tokens"] = cold, hit
    ttft["hit_over_cold"] = ttft["prefix_hit_ms"] / ttft["cold_ms"]
    res["ttft"] = ttft
    res["stats"] = engine.stats()
    del llm, engine, prof
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # --- reference generate: no cache and contiguous cache ------------------------------------------------
    p = rand(long_prompt)
    ref_new = n_new if not cuda else 64  # the no-cache baseline is quadratic: fewer tokens keep it bounded
    for name, use_cache in (("no_cache", False), ("contiguous_cache", True)):
        generate(model, p[:32], 4, use_cache=use_cache)
        sync()
        t = time.perf_counter()
        generate(model, p, ref_new, use_cache=use_cache)
        sync()
        ss[f"{name}_ms_per_token"] = (time.perf_counter() - t) / ref_new * 1e3
    ss["reference_new_tokens"] = ref_new
    res["single_stream"] = ss
    save()
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # --- HF transformers -----------------------------------------------------------------------------------
    if not args.skip_hf:
        res["subset"]["hf_dynamic"] = run_hf(args, "dynamic", args.hf_timeout)
        save()
        if cuda:
            res["subset"]["hf_static_compile"] = run_hf(args, "static", args.hf_timeout)
        sub = res["subset"]
        for k in ("hf_dynamic", "hf_static_compile"):
            if sub.get(k, {}).get("tok_per_s"):
                sub[f"speedup_vs_{k}"] = sub["llmray_tok_per_s"] / sub[k]["tok_per_s"]
        save()
    plot(res, out_dir / "engine.png")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
