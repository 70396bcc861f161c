"""Plot bench/results/serve.json (bench/serve.py): output tok/s and TTFT p50 per concurrency, per path.

python bench/plot_serve.py bench/results/serve.json bench/results/serve.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(src: str, dst: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(Path(src).read_text())
    mixes = {k: v for k, v in r["mixes"].items() if v["offline"] and v["http"]}
    fig, axes = plt.subplots(len(mixes), 2, figsize=(10, 3.6 * len(mixes)), squeeze=False)
    for row, (mix, m) in zip(axes, mixes.items(), strict=True):
        levels = sorted(m["offline"], key=int)
        x = [int(c) for c in levels]
        have = [p for p in ("offline", "async_llm", "http") if all(c in m.get(p, {}) for c in levels)]
        styles = {"offline": "k-o", "async_llm": "b-s", "http": "r-^"}
        for path in have:
            row[0].plot(x, [m[path][c]["output_tok_per_s"] for c in levels], styles[path], label=path)
        for path, style in ((p, styles[p]) for p in have if p != "offline"):
            row[1].plot(x, [m[path][c]["ttft_ms_p50"] for c in levels], style, label=f"{path} p50")
            row[1].plot(
                x, [m[path][c]["ttft_ms_p99"] for c in levels], style.replace("-", ":"), label=f"{path} p99"
            )
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_xticks(x, [str(v) for v in x])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        row[0].set_ylabel("output tokens/s")
        row[1].set_ylabel("TTFT (ms)")
        ratios = ", ".join(f"{c}: {m['http_vs_offline'][c]}" for c in levels)
        row[0].set_title(f"{mix} tokens, {r['device']} (HTTP/offline {ratios})", fontsize=9)
        row[1].set_title(f"{mix}: time to first token", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
