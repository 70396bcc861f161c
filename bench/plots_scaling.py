"""Plots of the scaling results (multi-LoRA, multi-GPU) and of a demo run's loss curves; ``bench/plots.py``
calls these (run that script, not this module).

- ``bench/results/lora.png``            lora.json: multi-LoRA throughput vs base, LoRA kernel times
- ``bench/results/multigpu.png``        multigpu.json, multigpu_fsdp.json: 1 vs 2 GPUs (DDP, FSDP2):
                                         tokens/s, peak memory, loss agreement at the same global batch
- ``bench/results/multigpu_serve.png``  multigpu_serve.json: Serve autoscaling 1 -> 2 replicas timeline
- ``docs/demo_losses.png``              a ``llmray demo --out DIR`` run's pretraining and fine-tuning losses
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from plots import BLUE, GREEN, GREY, ORANGE, load, save


# --- multi-LoRA ------------------------------------------------------------------------------------
def lora(results: Path) -> Path:
    """Engine throughput with adapters (lora.json's rows); the kernel micro-benchmark when the run had one."""
    lo = load(results, "lora.json")
    rows, w, ks = lo["rows"], lo["workload"], lo.get("kernels")
    fig, axes = plt.subplots(1, 2 if ks else 1, figsize=(12 if ks else 7, 4.2), squeeze=False)
    a = axes[0][0]
    names = list(rows)
    vals = [rows[n]["tokens_per_s"] for n in names]
    a.bar(range(len(names)), vals, color=[GREY] + [BLUE] * (len(names) - 1))
    for i, n in enumerate(names):
        a.text(i, vals[i], f"{vals[i]:,.0f}\n{rows[n]['vs_base']:.3f}×", ha="center", va="bottom", fontsize=8)
    a.axhline(0.85 * rows["base_engine_without_lora"]["tokens_per_s"], color="black", ls=":", lw=1)
    labels = [n.replace("_", " ").replace(" on ", "\non ").replace(" prefill", "\nprefill") for n in names]
    a.set_xticks(range(len(names)), labels, fontsize=8)
    a.set_ylim(0, max(vals) * 1.2)
    a.set_ylabel("output tokens / s (best of repeats)")
    a.set_title(
        f"{w['num_seqs']} seqs × {w['prompt_len']} in / {w['output_len']} out, rank {w['rank']}, {lo['device']} "
        "(lora.json; dotted: 0.85× base)",
        fontsize=10,
    )
    if ks:
        b = axes[0][1]
        keys = list(ks)
        x = range(len(keys))
        width = 0.27
        for j, (key, color, label) in enumerate(
            (("lora_ms", BLUE, "llmray LoRA shrink+expand"), ("torch_gather_ms", GREY, "torch gather reference"),
             ("base_matmul_ms", GREEN, "base matmul"))
        ):  # fmt: skip
            b.bar(
                [i + (j - 1) * width for i in x], [ks[k][key] for k in keys], width, color=color, label=label
            )
        b.set_yscale("log")
        b.set_xticks(list(x), [k.replace("_rows_", " rows\n").replace("_", " ") for k in keys], fontsize=8)
        b.set_ylabel("ms (log)")
        b.set_title("one LoRA'd linear 1024 → 3072, bf16 (lora.json)", fontsize=10)
        b.legend(fontsize=8)
    return save(fig, results / "lora.png")


# --- multi-GPU ------------------------------------------------------------------------------------
def multigpu(results: Path) -> Path:
    runs = {**load(results, "multigpu.json")["runs"]}
    fsdp = load(results, "multigpu_fsdp.json")["runs"]
    runs["fsdp"], runs["single (fsdp run)"] = fsdp["fsdp"], fsdp["single"]
    order = ["single", "ddp", "single (fsdp run)", "fsdp"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    vals = [runs[k]["tokens_per_s"] for k in order]
    a.bar(range(4), vals, color=[GREY, BLUE, GREY, GREEN])
    for i, k in enumerate(order):
        note = f"{vals[i]:,.0f}\n{runs[k]['peak_mem_gb']:.1f} GB/GPU"
        a.text(i, vals[i], note, ha="center", va="bottom", fontsize=8)
    a.set_xticks(range(4), [f"{k}\n{runs[k]['world']} GPU" for k in order], fontsize=8)
    a.set_ylim(0, max(vals) * 1.25)
    a.set_ylabel("training tokens / s")
    a.set_title("qwen3-0.6b, 8×2048 per GPU (multigpu.json, multigpu_fsdp.json)", fontsize=10)
    for k, color, style in (("single", GREY, "-"), ("ddp", BLUE, "--"), ("fsdp", GREEN, ":")):
        b.plot(
            range(1, len(runs[k]["agree_losses"]) + 1), runs[k]["agree_losses"], style, color=color, label=k
        )
    b.set_xlabel("step (same global batch on 1 and 2 GPUs)")
    b.set_ylabel("training loss")
    b.set_title("loss agreement, 1 vs 2 GPUs", fontsize=10)
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    return save(fig, results / "multigpu.png")


def multigpu_serve(results: Path) -> Path:
    d = load(results, "multigpu_serve.json")
    tl = d["phases"]["autoscale"]["timeline"]
    fig, ax = plt.subplots(figsize=(7, 4.0))
    ts = [p["t_s"] for p in tl]
    ax.plot(ts, [p["output_tok_per_s"] for p in tl], color=BLUE, lw=1, label="output tokens/s")
    ax2 = ax.twinx()
    ax2.step(
        ts,
        [p["replicas"].get("RUNNING", 0) for p in tl],
        color=ORANGE,
        where="post",
        label="RUNNING replicas",
    )
    ax2.set_ylim(0, 3)
    ax2.set_ylabel("engine replicas RUNNING")
    ax.set_xlabel("s since load started")
    ax.set_ylabel("output tokens / s")
    ratio = d["throughput_ratio_2_over_1"]
    ax.set_title(
        f"Serve autoscaling 1 → 2 replicas; fixed 2 vs 1: {ratio}× (multigpu_serve.json)", fontsize=10
    )
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    return save(fig, results / "multigpu_serve.png")


# --- the demo's loss curves ------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --demo must be a `llmray demo --out DIR` directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def demo_losses(demo: Path, docs: Path) -> Path:
    base, adapter = (
        _read_jsonl(demo / "base" / "metrics.jsonl"),
        _read_jsonl(demo / "adapter" / "metrics.jsonl"),
    )
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, rows, title in ((a, base, "pretraining (base)"), (b, adapter, "LoRA fine-tuning (adapter)")):
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and r.get("event") is None]
        val = [
            (r["step"], r["val_loss"])
            for r in rows
            if r.get("val_loss") is not None and r.get("event") != "final"
        ]
        ax.plot(*zip(*train), color=BLUE, lw=1, label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", color=ORANGE, label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(f"{title}: {demo.name}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    final = next((r for r in adapter if r.get("event") == "final"), None)
    if final:
        b.set_title(
            f"LoRA fine-tuning: val {final['val_loss_before']:.3f} (base) → {final['val_loss_after']:.3f} (adapter)",
            fontsize=10,
        )
    return save(fig, docs / "demo_losses.png")
