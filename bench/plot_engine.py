"""The engine figure of ``bench/plots.py`` (run that script): ``bench/results/engine_batch.png`` from
engine.json (output tok/s of each run) and engine_profile.json (a batch-200+ decode step's host phases and
wall time, at session start and now)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from plots import BLUE, GREEN, GREY, ORANGE, load, save


def engine_runs(ax: Any, eng: dict[str, Any]) -> None:
    """Output tok/s of each engine.json run (bf16, then fp8 when measured)."""
    runs = [(f"bf16\nrun {i + 1}", v, BLUE) for i, v in enumerate(eng.get("nano_vllm_tok_s", []))]
    runs += [(f"fp8\nrun {i + 1}", v, GREEN) for i, v in enumerate(eng.get("nano_vllm_fp8_tok_s", []))]
    ax.bar(range(len(runs)), [v for _, v, _ in runs], color=[c for _, _, c in runs])
    for i, (_, v, _) in enumerate(runs):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(runs)), [n for n, _, _ in runs], fontsize=8)
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"engine: {eng.get('workload', '')} (engine.json)", fontsize=9)


STEP_PARTS = (
    ("host_schedule_ms", GREY, "schedule (host)"),
    ("host_launch_ms (inputs + enqueue)", ORANGE, "build inputs + launch (host)"),
    ("host_postprocess_ms", GREEN, "post-process (host)"),
)


def engine_batch(results: Path) -> Path:
    """Engine throughput per run, and a batch-200+ decode step's host phases before/after (engine_profile.json)."""
    eng, prof = load(results, "engine.json"), load(results, "engine_profile.json")
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    engine_runs(a, eng)
    cols = []  # (label, {part: ms}, step wall ms)
    for name, d in (
        ("session start", prof.get("before", {}).get("profile", {})),
        ("now", prof.get("after", {})),
    ):
        for mode in ("sync", "async"):
            row = d.get(mode, {}).get("decode_bs200+")
            if row:
                cols.append((f"{name}\n{mode}", row))
    bottom = [0.0] * len(cols)
    for part, color, label in STEP_PARTS:
        vals = [row.get(part, 0.0) for _, row in cols]
        b.bar(range(len(cols)), vals, bottom=bottom, color=color, label=label)
        bottom = [u + v for u, v in zip(bottom, vals, strict=True)]
    for i, (_, row) in enumerate(cols):
        b.text(
            i, row["step_wall_ms"], f"{row['step_wall_ms']:.2f} ms wall", ha="center", va="bottom", fontsize=7
        )
        b.plot([i - 0.4, i + 0.4], [row["step_wall_ms"]] * 2, color="black", lw=1)
    b.set_xticks(range(len(cols)), [n for n, _ in cols], fontsize=8)
    b.set_ylabel("ms per decode step (batch 200+)")
    b.set_title("engine step: host phases and wall time (engine_profile.json)", fontsize=10)
    b.legend(fontsize=8)
    return save(fig, results / "engine_batch.png")
