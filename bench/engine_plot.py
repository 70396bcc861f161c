"""``bench/results/engine.png`` from engine.json: the nano-vllm workload's three runs with
bf16 and fp8 KV against their targets, single-stream TPOT and the prefix-hit TTFT ratio against theirs.

    python bench/engine_plot.py [bench/results/engine.json]     # bench/engine.py calls it after its runs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {"bf16": 25_000, "fp8": 32_000, "tpot_ms": 1.5, "hit_over_cold": 0.3}


def plot(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2.2, 1]})
    x = 0
    for key, name, color in (
        ("nano_vllm_tok_s", "bf16", "#1f77b4"),
        ("nano_vllm_fp8_tok_s", "fp8", "#2ca02c"),
    ):
        runs = res.get(key) or []
        xs = list(range(x, x + len(runs)))
        a.bar(xs, runs, color=color, label=f"{name} KV cache")
        for i, v in zip(xs, runs, strict=True):
            a.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
        if runs:
            t = TARGETS[name]
            a.plot([xs[0] - 0.45, xs[-1] + 0.45], [t, t], "--", color="black", lw=1)
            a.text(xs[-1] + 0.5, t, f"target {t:,}", va="center", fontsize=7)
        x += len(runs) + 1
    labels = [f"run {i + 1}" for i in range(len(res.get("nano_vllm_tok_s") or []))]
    labels += [""] + [f"run {i + 1}" for i in range(len(res.get("nano_vllm_fp8_tok_s") or []))]
    a.set_xticks(range(len(labels)), labels, fontsize=8)
    a.set_ylabel("output tokens / s")
    a.set_title(f"nano-vllm workload: {res.get('workload', '')}", fontsize=9)
    a.legend(fontsize=8, loc="lower right")
    vals = [
        ("TPOT (ms)", res.get("single_stream_tpot_ms"), TARGETS["tpot_ms"]),
        ("prefix hit /\ncold TTFT", res.get("prefix_hit_over_cold"), TARGETS["hit_over_cold"]),
    ]
    vals = [v for v in vals if v[1] is not None]
    b.bar(range(len(vals)), [v for _, v, _ in vals], color="#ff7f0e")
    for i, (_, v, t) in enumerate(vals):
        b.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        b.plot([i - 0.4, i + 0.4], [t, t], "--", color="black", lw=1)
        b.text(i + 0.42, t, f"target {t}", va="center", fontsize=7)
    b.set_xticks(range(len(vals)), [n for n, _, _ in vals], fontsize=8)
    b.set_title("single stream (lower is better)", fontsize=9)
    fig.suptitle(f"llmray engine, qwen3-0.6b shapes, {res.get('device', '')} (engine.json)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "engine.json")
    print(plot(json.loads(src.read_text()), src.with_name("engine.png")))
