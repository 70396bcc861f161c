"""Plots of the committed benchmark results: reads bench/results/*.json, writes PNGs (matplotlib, Agg).

Only what the JSON files hold is drawn; each figure's title names the JSON it came from. Figures:

- ``bench/results/engine_batch.png``     engine.json, engine_profile.json (``bench/plot_engine.py``): output
                                          tok/s per run; a decode step's host phases and wall time
- ``bench/results/serve_concurrency.png`` serve.json: output tokens/s vs concurrency (128/128 mix), offline
                                          vs AsyncLLM vs HTTP
- ``bench/results/serve_latency.png``    serve.json: TTFT and time per output token p50/p99 vs concurrency
- ``bench/results/serve_stream_interval_cpu.png`` serve_cpu_stream_interval.json (CPU, indicative)
- ``bench/results/lora.png``             lora.json: multi-LoRA throughput vs base, LoRA kernel times
- ``bench/results/multigpu.png``, ``multigpu_serve.png``  multigpu*.json: 1 vs 2 GPUs (tokens/s, loss
                                          agreement), Serve autoscaling timeline
- ``bench/results/kernels.png``          kernels.json: GB/s per kernel (Triton, eager, compile), fused CE
- ``bench/results/finetune.png``         finetune.json, finetune_params.json: memory, tokens/s, params
- ``bench/results/train_summary.png``    train.json: Muon vs AdamW steps to 1.55, qwen3-0.6b tokens/s, MFU
- ``docs/results_overview.png``          one figure of the headline comparisons above
- ``docs/demo_losses.png``               with ``--demo DIR``: the pretraining and fine-tuning loss curves
                                          of a ``llmray demo --out DIR`` run (DIR/base, DIR/adapter
                                          metrics.jsonl)

The pretraining loss curves of the H200 runs are the PNGs ``bench/train.py`` wrote next to train.json
(train_shakespeare_char.png, train_muon_vs_adamw.png, train_seed7m_bpe.png); train.json itself holds
only their summaries, so they are not redrawn here.

    python bench/plots.py                                   # bench/results -> PNGs
    python bench/plots.py --demo bench/results/demo_quick   # plus docs/demo_losses.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DPI = 100
BLUE, ORANGE, GREEN, GREY = "tab:blue", "tab:orange", "tab:green", "tab:gray"


def load(results: Path, name: str) -> dict[str, Any]:
    path = results / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found; run the benchmark that writes it (see docs/benchmarks.md)"
        )
    return json.loads(path.read_text())


def save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return path


def _levels(d: dict[str, Any]) -> list[int]:
    return sorted(int(k) for k in d)


# --- engine ----------------------------------------------------------------------------------------
# --- serving ---------------------------------------------------------------------------------------
SERVE_PATHS = (
    ("offline", "black", "offline LLM.generate"),
    ("async_llm", BLUE, "AsyncLLM (engine core process)"),
    ("http", ORANGE, "HTTP through llmray serve"),
)


def _serve_mix(s: dict[str, Any], mix: str = "128/128") -> tuple[list[int], list[tuple[str, str, str]], dict]:
    """serve.json's levels of one mix and the paths measured at every one of them."""
    m = s["mixes"][mix]
    levels = _levels(m["http"])
    paths = [p for p in SERVE_PATHS if all(str(c) in m.get(p[0], {}) for c in levels)]
    return levels, paths, m


def serve_concurrency(results: Path) -> Path:
    s = load(results, "serve.json")
    levels, paths, m = _serve_mix(s)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, color, name in paths:
        ys = [m[key][str(c)]["output_tok_per_s"] for c in levels]
        ax.plot(levels, ys, "o-", color=color, label=name)
        for c, y in zip(levels, ys):
            ax.annotate(
                f"{y:,.0f}", (c, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent streaming requests")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"throughput vs concurrency, 128/128 tokens, {s['model']}\n(serve.json)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, results / "serve_concurrency.png")


def serve_latency(results: Path) -> Path:
    s = load(results, "serve.json")
    levels, paths, m = _serve_mix(s)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, metric, title in (
        (axes[0], "ttft", "time to first token"),
        (axes[1], "tpot", "time per output token"),
    ):
        for key, color, name in paths:
            if key == "offline":  # offline has no per-request latencies
                continue
            for pct, style in (("p50", "o-"), ("p99", "s--")):
                ys = [m[key][str(c)][f"{metric}_ms_{pct}"] for c in levels]
                ax.plot(levels, ys, style, color=color, label=f"{name} {pct}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent streaming requests")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"{title}, 128/128 tokens (serve.json)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save(fig, results / "serve_latency.png")


def serve_stream_interval(results: Path) -> Path:
    s = load(results, "serve_cpu_stream_interval.json")
    keys = sorted(s["runs"], key=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = range(len(keys))
    w = 0.38
    serve_tps = [s["runs"][k]["serve"]["output_tok_per_s"] for k in keys]
    direct_tps = [s["runs"][k]["direct"]["output_tok_per_s"] for k in keys]
    ax.bar([i - w / 2 for i in x], direct_tps, w, color=BLUE, label="AsyncLLM direct")
    ax.bar([i + w / 2 for i in x], serve_tps, w, color=ORANGE, label="HTTP + Serve")
    for i, k in enumerate(keys):
        ratio = s["runs"][k]["serve_vs_direct"]["throughput_ratio"]
        ax.text(i + w / 2, serve_tps[i], f"{ratio:.2f}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [f"{k} ms" for k in keys])
    ax.set_xlabel("--stream-interval-ms (LLMServer token batching)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(
        "CPU, tiny model, concurrency 16: indicative only\n(serve_cpu_stream_interval.json)", fontsize=10
    )
    ax.legend(fontsize=8)
    return save(fig, results / "serve_stream_interval_cpu.png")


# --- kernels ---------------------------------------------------------------------------------------
def kernels(results: Path) -> Path:
    k = load(results, "kernels.json")
    rows = k["elementwise"]
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    impls = (
        ("triton", BLUE, "llmray Triton"),
        ("torch_compile", GREEN, "torch.compile"),
        ("torch_eager", GREY, "eager"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [2, 2, 1.2]})
    w = 0.27
    for ax, mode in ((axes[0], "fwd"), (axes[1], "fwd+bwd")):
        for j, (impl, color, label) in enumerate(impls):
            vals = [
                next(r["GBps"] for r in rows if (r["kernel"], r["impl"], r["mode"]) == (n, impl, mode))
                for n in names
            ]
            ax.bar([i + (j - 1) * w for i in range(len(names))], vals, w, color=color, label=label)
        ax.axhline(k["copy"]["GBps_wall"], color="black", ls=":", lw=1)
        ax.text(len(names) - 0.5, k["copy"]["GBps_wall"], "4 GB copy", ha="right", va="bottom", fontsize=8)
        ax.set_xticks(
            range(len(names)), [n.replace("_", "_\n", 1) if len(n) > 8 else n for n in names], fontsize=8
        )
        ax.set_ylabel("GB/s (bf16, 16,384 tokens)")
        ax.set_title(f"{mode} (kernels.json)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    ce = k["fused_ce"]
    fused, ref = ce["fused_triton"], ce["logits_plus_F_cross_entropy"]
    ax = axes[2]
    ax.bar([0, 1], [fused["peak_extra_GB"], ref["peak_extra_GB"]], color=[BLUE, GREY])
    for i, (gb, ms) in enumerate(
        ((fused["peak_extra_GB"], fused["fwd_bwd_ms"]), (ref["peak_extra_GB"], ref["fwd_bwd_ms"]))
    ):
        ax.text(i, gb, f"{gb:.2f} GB\n{ms:.1f} ms fwd+bwd", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([0, 1], ["fused linear CE\n(Triton)", "logits +\nF.cross_entropy"], fontsize=8)
    ax.set_ylabel("peak extra memory (GB)")
    ax.set_ylim(0, ref["peak_extra_GB"] * 1.3)
    ax.set_title(f"{ce['tokens']} tok × {ce['vocab']:,} vocab", fontsize=10)
    return save(fig, results / "kernels.png")


# --- fine-tuning -----------------------------------------------------------------------------------
def _ft_label(r: dict[str, Any]) -> str:
    label = "full" if r["mode"] == "full" else f"{r['mode']}\n{r['targets']} r{r['r']}"
    return label + ("\n+graphs" if r.get("cuda_graphs") else "")


def _ft_runs(results: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The fine-tuning runs: finetune.json's list, or finetune_details.json's {name: run} (current format)."""
    ft = load(results, "finetune.json")
    if "runs" not in ft:
        ft = load(results, "finetune_details.json")
    runs = ft["runs"]
    return ft, list(runs.values()) if isinstance(runs, dict) else runs


def finetune(results: Path) -> Path:
    (ft, runs), params = _ft_runs(results), load(results, "finetune_params.json")
    labels = [_ft_label(r) for r in runs]
    colors = [GREY if r["mode"] == "full" else (BLUE if r["mode"] == "lora" else GREEN) for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, ylabel in (
        (axes[0], "peak_mem_gib", "peak GPU memory (GiB)"),
        (axes[1], "tokens_per_s", "training tokens / s"),
    ):
        vals = [r[key] for r in runs]
        ax.bar(range(len(runs)), vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(
                i,
                v,
                f"{v:,.2f}" if key == "peak_mem_gib" else f"{v:,.0f}",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(range(len(runs)), labels, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ft['preset']}, batch 8 × 1024 (finetune_details.json)", fontsize=10)
    cfgs = params["configs"]
    ax = axes[2]
    vals = [c["reduction_vs_full"] for c in cfgs]
    ax.bar(range(len(cfgs)), vals, color=BLUE)
    ax.axhline(1000, color="black", ls=":", lw=1)
    for i, c in enumerate(cfgs):
        ax.text(
            i, vals[i], f"{vals[i]:.0f}×\n{c['adapter_mb_fp32']} MB", ha="center", va="bottom", fontsize=8
        )
    ax.set_xticks(range(len(cfgs)), [f"{c['targets']}\nr{c['r']}" for c in cfgs], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("full params / trainable params (log)")
    ax.set_title("parameter reduction, adapter size (finetune_params.json)", fontsize=10)
    return save(fig, results / "finetune.png")


# --- pretraining -----------------------------------------------------------------------------------
def train_summary(results: Path) -> Path:
    """Pretraining throughput and MFU of each variant (train_details.json, else train.json), with the Muon vs
    AdamW sweep beside it when the results hold one."""
    t = load(results, "train.json")
    details = load(results, "train_details.json") if (results / "train_details.json").exists() else {}
    sweep = (t.get("b_muon_vs_adamw") or details.get("b_muon_vs_adamw") or {}).get("sweep")
    c = t.get("c_qwen3_0.6b_throughput") or details["c_qwen3_0.6b_throughput"]
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(12 if sweep else 7, 4.2), squeeze=False)
    if sweep:
        a = axes[0][0]
        colors = [BLUE if r["optimizer"] == "muon" else ORANGE for r in sweep]
        a.bar(range(len(sweep)), [r["steps_to_1.55"] for r in sweep], color=colors)
        for i, r in enumerate(sweep):
            a.text(i, r["steps_to_1.55"], f"{r['steps_to_1.55']}", ha="center", va="bottom", fontsize=8)
        a.set_xticks(range(len(sweep)), [f"{r['optimizer']}\nlr {r['lr']}" for r in sweep], fontsize=8)
        a.set_ylabel("steps to val loss 1.55 (eval every 50)")
        a.set_title("shakespeare-char: Muon vs AdamW lr sweep (train.json)", fontsize=10)

    b = axes[0][-1]
    rows = [(name, r) for name, r in c.items() if isinstance(r, dict) and "tokens_per_s" in r]
    vals = [r["tokens_per_s"] for _, r in rows]
    b.bar(range(len(rows)), vals, color=[BLUE if n.startswith("triton") else GREY for n, _ in rows])
    for i, (_, r) in enumerate(rows):
        b.text(
            i,
            vals[i],
            f"{vals[i]:,.0f} tok/s\nMFU {100 * r['mfu']:.1f}%",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    b.set_xticks(range(len(rows)), [n.replace("+", "\n+ ").replace("_", " ") for n, _ in rows], fontsize=8)
    b.set_ylim(0, max(vals) * 1.25)
    b.set_ylabel("training tokens / s")
    source = "train.json" if "c_qwen3_0.6b_throughput" in t else "train_details.json"
    b.set_title(f"qwen3-0.6b, {c['batch']}×{c['seq_len']} bf16, one H200, Ray Train ({source})", fontsize=10)
    return save(fig, results / "train_summary.png")


# --- overview for the README -----------------------------------------------------------------------
def overview(results: Path, docs: Path) -> Path:
    eng, s = load(results, "engine.json"), load(results, "serve.json")
    k, (_, ft_runs) = load(results, "kernels.json"), _ft_runs(results)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    from plot_engine import engine_runs

    engine_runs(axes[0][0], eng)

    ax = axes[0][1]
    levels, paths, m = _serve_mix(s)
    for key, color, name in paths:
        ax.plot(levels, [m[key][str(c)]["output_tok_per_s"] for c in levels], "o-", color=color, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens / s")
    ax.set_title("serving throughput (serve.json)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1][0]
    rows = [
        r for r in k["elementwise"] if r["mode"] == "fwd" and r["kernel"] in ("rms_norm", "rope", "swiglu")
    ]
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    w = 0.27
    for j, (impl, color, label) in enumerate(
        (
            ("triton", BLUE, "llmray Triton"),
            ("torch_compile", GREEN, "torch.compile"),
            ("torch_eager", GREY, "eager"),
        )
    ):
        vals = [next(r["GBps"] for r in rows if r["kernel"] == n and r["impl"] == impl) for n in names]
        ax.bar([i + (j - 1) * w for i in range(len(names))], vals, w, color=color, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("GB/s, fwd, 16k tokens")
    ax.set_title("kernels (kernels.json)", fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[1][1]
    # one run per mode (the first: finetune_details.json also holds CUDA-graph variants of the same memory)
    kept = [r for r in ft_runs if r["targets"] in (None, "all-linear") and not r.get("lora_impl") == "peft"]
    runs = [
        r for m in ("full", "lora", "qlora") for r in [next((r for r in kept if r["mode"] == m), None)] if r
    ]
    vals = [r["peak_mem_gib"] for r in runs]
    ax.bar(range(len(runs)), vals, color=[GREY, BLUE, GREEN][: len(runs)])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f} GiB", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(runs)), [_ft_label(r) for r in runs], fontsize=8)
    ax.set_ylabel("peak GPU memory (GiB)")
    ax.set_title("fine-tuning qwen3-0.6b, 8×1024 (finetune_details.json)", fontsize=10)
    fig.suptitle("llmray on one NVIDIA H200 (random weights; bench/results/)", fontsize=11)
    return save(fig, docs / "results_overview.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder of the benchmark JSON")
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="where the README/doc figures go")
    ap.add_argument("--demo", help="a `llmray demo --out DIR` directory: also plot its loss curves")
    args = ap.parse_args(argv)
    results, docs = Path(args.results), Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    import plots_scaling as scaling  # imports this module's helpers: load it only once this one is complete
    from plot_engine import engine_batch

    plots = (engine_batch, serve_concurrency, serve_latency, serve_stream_interval, kernels, finetune)
    for plot in (*plots, train_summary, scaling.lora, scaling.multigpu, scaling.multigpu_serve):
        try:
            plot(results)
        except KeyError as e:  # a results file another bench rewrote in a newer format: say so, draw the rest
            print(f"skipped {plot.__name__}: its results JSON has no key {e}")
    overview(results, docs)
    if args.demo:
        scaling.demo_losses(Path(args.demo), docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
