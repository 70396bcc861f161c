"""Summarize py-spy raw recordings (``py-spy record --format raw --threads``): samples per thread and the
functions they were in (leaf frames, and frames anywhere on the stack matching ``--match``).

    python bench/pyspy_summary.py /work/gpu_results/A/batch/pyspy-*.txt [--top 12] [--match step,add_request]

With ``--gil`` recordings a thread's share of samples is its share of the GIL; without, a thread waiting for
the GIL (or blocked) is not sampled, so a thread's samples / (rate x seconds) is the time it ran.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

LINE = re.compile(r"^(thread \(\w+\): [^;]*);?(.*) (\d+)$")


def summarize(path: Path, top: int, match: list[str]) -> str:
    threads: Counter[str] = Counter()
    leaves: dict[str, Counter[str]] = defaultdict(Counter)
    inside: dict[str, Counter[str]] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        m = LINE.match(line.strip())
        if not m:
            continue
        thread, stack, count = m.group(1), m.group(2), int(m.group(3))
        frames = [f.split(" (")[0] for f in stack.split(";") if f]
        threads[thread] += count
        leaves[thread][frames[-1] if frames else "?"] += count
        for word in match:
            if any(word in f for f in frames):
                inside[thread][word] += count
    total = sum(threads.values())
    out = [f"{path.name}: {total} samples"]
    for thread, n in threads.most_common():
        out.append(f"  {thread}: {n} ({100 * n / max(total, 1):.1f}%)")
        for word, k in inside[thread].most_common():
            out.append(f"      in {word}: {k} ({100 * k / n:.1f}% of the thread)")
        for leaf, k in leaves[thread].most_common(top):
            out.append(f"      {k:6d} {leaf}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument(
        "--match", default="step,_launch,_read_back,add_request,_prepare,tokenize,get_all,_finish"
    )
    args = ap.parse_args()
    for f in args.files:
        print(summarize(Path(f), args.top, [w for w in args.match.split(",") if w]))


if __name__ == "__main__":
    main()
