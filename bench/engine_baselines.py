"""The engine next to HF transformers and no-cache/contiguous-cache baselines (the engine's own figures: engine.py).

    python bench/engine_baselines.py --out DIR            # on a GPU (about 5 minutes); writes DIR/engine.json
    python bench/engine_baselines.py --quick --out /tmp/b # tiny model on CPU: checks the script only

Workload: Qwen3-0.6B shapes, random bf16 weights, 256 sequences with prompt and output lengths uniform in
[100, 1024] (seed 0), ignore_eos, temperature 0.6 -> output tokens/s, peak memory, KV actually used.
Also: paged-decode kernel KV bandwidth; HF ``generate`` (dynamic cache; static cache + compile) on a
32-sequence subset (left-padded, outputs capped at --hf-max-new, counting only requested tokens) next to
the engine on the same subset; single-stream decode ms/token (512 in, 256 new) for the engine and the
reference ``generate`` without and with a contiguous KV cache; TTFT of a 1024-token prompt and of a second
request sharing a 1000-token prefix. Writes engine.json (after every section) and engine.png.
``--profile``: host timings by batch size with sync vs async scheduling + torch.profiler tables
(engine_host_profile.py); the HF side runs in a subprocess (engine_hf.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_common import build_model, model_config, stream_times, sync, timed_generate, workload  # noqa: E402
from engine_hf import hf_child, run_hf, subset  # noqa: E402
from engine_host_profile import StepProfiler, profile_main  # noqa: E402

from llmray.config import ModelConfig  # noqa: E402


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
