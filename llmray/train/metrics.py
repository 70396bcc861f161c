"""Rank 0's training metrics: console progress lines, a JSONL file per run, loss-curve PNGs, FLOPs and MFU.

Ray Train V2 keeps only metrics reported together with a checkpoint, so every step's record is also
written here (``MetricsLogger``), and benchmarks read the file back (``read_metrics``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

H100_H200_BF16_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak (SXM), as used for MFU


# --- throughput -----------------------------------------------------------------------------------------
def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 6 L S H D (N = matmul parameters, tied head counted once)."""
    n = config.num_params() - config.num_hidden_layers * (2 * config.hidden_size + 2 * config.head_dim)
    n -= config.hidden_size  # final norm
    attn = 6 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 6 * n + attn


def mfu(
    tokens_per_s: float, config: Any, seq_len: int, peak_flops: float = H100_H200_BF16_PEAK_FLOPS
) -> float:
    return tokens_per_s * flops_per_token(config, seq_len) / peak_flops


# --- logging --------------------------------------------------------------------------------------------
class MetricsLogger:
    """Per-step metrics of rank 0: one JSON line each in ``path``, a progress line on the console every
    ``print_every`` steps (default: about 20 lines a run), on the first and last step and with validation.

    ``resume_step`` drops lines past the step a resumed run restarts from, so the file holds one curve.
    """

    def __init__(
        self,
        path: str | Path | None,
        max_steps: int,
        resume_step: int = 0,
        enabled: bool = True,
        print_every: int | None = None,
    ):
        self.path = Path(path) if path else None
        self.max_steps = max_steps
        self.enabled = enabled
        self.print_every = print_every or max(1, max_steps // 20)
        self.t0 = time.perf_counter()
        self.first_step = resume_step
        if enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = (
                [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
            )
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if console and self._prints(record):
            print(self.progress_line(record), flush=True, file=sys.stdout)

    def _prints(self, r: dict[str, Any]) -> bool:
        step = r.get("step")
        if step is None or "val_loss" in r or step in (self.first_step + 1, self.max_steps):
            return True
        return step % self.print_every == 0

    def progress_line(self, r: dict[str, Any]) -> str:
        step = r.get("step", 0)
        done = max(1, step - self.first_step)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * max(0, self.max_steps - step)
        parts = [f"step {step}/{self.max_steps}"]
        for key, fmt in (
            ("loss", "{:.4f}"),
            ("val_loss", "{:.4f}"),
            ("lr", "{:.2e}"),
            ("tokens_per_s", "{:,.0f}"),
        ):
            if key in r:
                parts.append(f"{key.replace('tokens_per_s', 'tok/s')} " + fmt.format(r[key]))
        if r.get("mfu", 0) >= 0.0005:  # 0 on CPU (no peak FLOP/s to compare with); ~0 on a step that compiled
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        parts.append(f"eta {eta:.0f}s")
        return " | ".join(parts)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(
    curves: dict[str, list[dict[str, Any]]], out_png: str | Path, title: str = "loss", x: str = "step"
) -> Path:
    """One PNG with train loss (thin) and val loss (markers) of each named metrics list."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, records) in enumerate(curves.items()):
        color = f"C{i}"
        train = [(r[x], r["loss"]) for r in records if "loss" in r]
        val = [(r[x], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, alpha=0.35, lw=0.8, label=f"{name} train")
        if val:
            ax.plot(*zip(*val, strict=True), color=color, marker="o", ms=3, lw=1.5, label=f"{name} val")
    ax.set_xlabel(x)
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
