"""How many distinct grammar states a step's constrained rows are in, and what their masks cost (CPU).

A replay of bench/structured.py's constrained rows without the model: ``--rows`` requests with its schema on
the engine's own llguidance path (``GrammarCompiler``), each step every row's mask filled in one executor
call (timed), then every row samples a token uniformly among those its mask allows (a random-weight model's
logits are nearly flat, so its samples are close to that) and accepts it. Per step it counts

- ``same_history``: groups of rows with the same accepted tokens (the only sharing one can know beforehand),
- ``distinct_masks``: distinct mask rows (what any sharing by grammar state could at best save),

and times each row's fill alone (``row_us``: where the fill's time goes; a "heavy" row, over 50 µs, is one
whose parser state changed: llguidance reuses a row's previous mask while its token stays inside one lexeme);
a second walk with the same seed (the same tokens) times the step's one executor fill (``fill_ms``: the
engine's call) and its ``consume_token_par``. Reported: medians / totals over the steps, the share of fill work an
exact-history share would save, and the one an ideal state share would (that needs the grammar state, which
llguidance does not expose).

    python bench/grammar_states.py --tokenizer-dir .data/bpe151k --rows 128 --steps 256 \
        --out bench/results/grammar_states.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from structured import SCHEMA  # noqa: E402

from llmray.engine.structured import StructuredOutput  # noqa: E402
from llmray.engine.structured.batch import usable_cpus  # noqa: E402
from llmray.engine.structured.compiler import GrammarCompiler  # noqa: E402
from llmray.engine.structured.llguidance_backend import fill_threads  # noqa: E402
from llmray.model.tokenizer import Tokenizer  # noqa: E402


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def allowed(row: np.ndarray, vocab: int) -> np.ndarray:
    """The token ids a mask row (int32 words) allows."""
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def walk(comp: GrammarCompiler, spec: StructuredOutput, ex, rows: int, steps: int, seed: int, per_row: bool):
    """One replay: each step every live row's mask (``per_row``: each row's fill alone, timed — its first
    computation at that state; else one executor call, timed), then a uniform pick among its allowed tokens,
    consumed in one executor call (timed). Returns the per-step records and every row's tokens."""
    cons = [comp.constraint(spec) for _ in range(rows)]
    words = -(-comp.vocab_size // 32)
    host = torch.zeros((rows, words), dtype=torch.int32)
    mask = host.numpy()
    rng = np.random.default_rng(seed)
    history: list[tuple] = [() for _ in range(rows)]
    live = list(range(rows))
    per_step: list[dict] = []
    for _ in range(steps):
        if not live:
            break
        times: list[float] = []
        t0 = time.perf_counter()
        if per_row:
            for k, r in enumerate(live):
                t1 = time.perf_counter()
                cons[r].matcher.unsafe_compute_mask_ptr(host[k].data_ptr(), words * 4)
                times.append((time.perf_counter() - t1) * 1e6)
        else:
            pairs = [(cons[r].matcher, k) for k, r in enumerate(live)]
            ex.unsafe_compute_mask_ptr(pairs, host.data_ptr(), words * 4, rows)
        rec: dict = {"rows": len(live), "fill_ms": (time.perf_counter() - t0) * 1e3, "times": times}
        if per_row:
            digests: dict[bytes, float] = {}
            for k, us in enumerate(times):
                d = hashlib.blake2b(mask[k].tobytes(), digest_size=16).digest()
                digests[d] = max(digests.get(d, 0.0), us)
            hist: dict[tuple, float] = {}
            for k, r in enumerate(live):
                hist[history[r]] = max(hist.get(history[r], 0.0), times[k])
            heavy = [us for us in times if us > 50]
            rec.update(
                row_sum_us=sum(times),
                same_history=len(hist),
                history_sum_us=sum(hist.values()),
                distinct_masks=len(digests),
                distinct_sum_us=sum(digests.values()),
                heavy_rows=len(heavy),
                heavy_sum_us=sum(heavy),
                max_row_us=max(times),
            )
        picks = [int(rng.choice(allowed(mask[k], comp.vocab_size))) for k in range(len(live))]
        t0 = time.perf_counter()
        oks = ex.consume_token_par([(cons[r].matcher, t) for r, t in zip(live, picks, strict=True)])
        rec["consume_ms"] = (time.perf_counter() - t0) * 1e3
        assert all(oks), "a token its mask allowed was rejected"
        per_step.append(rec)
        nxt = []
        for r, t in zip(live, picks, strict=True):
            history[r] = (*history[r], t)
            if t != comp.eos_token_id:
                nxt.append(r)
        live = nxt
    return per_step, history


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer-dir", default=".data/bpe151k")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="the executor's threads (0: the engine's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    tok = Tokenizer.load(args.tokenizer_dir)
    comp = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_id)
    spec = StructuredOutput(json=SCHEMA)
    backend = comp.backend(spec.library)
    if args.threads:
        import llguidance

        backend.executor = llguidance.LLExecutor(args.threads)
    ex = backend.executor
    rows_walk, hist_rows = walk(comp, spec, ex, args.rows, args.steps, args.seed, per_row=True)
    exec_walk, hist_exec = walk(comp, spec, ex, args.rows, args.steps, args.seed, per_row=False)
    assert hist_rows == hist_exec, "the two walks took different tokens"
    per_step = rows_walk
    for a, b in zip(per_step, exec_walk, strict=True):
        a["fill_ms"], a["consume_ms"] = b["fill_ms"], b["consume_ms"]
    row_us = [us for st in per_step for us in st.pop("times")]
    total = sum(s["row_sum_us"] for s in per_step)
    out = {
        "device": f"cpu ({cpu_name()}; llguidance on the host)",
        "rows": args.rows,
        "steps": len(per_step),
        "threads": args.threads or fill_threads(),
        "usable_cpus": usable_cpus(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "fill_ms_median": round(statistics.median(s["fill_ms"] for s in per_step), 3),
        "fill_ms_p90": round(sorted(s["fill_ms"] for s in per_step)[int(0.9 * len(per_step))], 3),
        "fill_ms_mean": round(statistics.mean(s["fill_ms"] for s in per_step), 3),
        "row_us_median": round(statistics.median(row_us), 1),
        "row_us_p90": round(sorted(row_us)[int(0.9 * len(row_us))], 1),
        "row_us_max": round(max(row_us), 1),
        "step_row_sum_ms_median": round(statistics.median(s["row_sum_us"] for s in per_step) / 1e3, 3),
        "step_row_sum_ms_mean": round(statistics.mean(s["row_sum_us"] for s in per_step) / 1e3, 3),
        "step_max_row_us_median": round(statistics.median(s["max_row_us"] for s in per_step), 1),
        "heavy_rows_median": statistics.median(s["heavy_rows"] for s in per_step),
        "heavy_share_of_fill_work": round(sum(s["heavy_sum_us"] for s in per_step) / total, 3),
        "consume_ms_median": round(statistics.median(s["consume_ms"] for s in per_step), 3),
        "same_history_median": statistics.median(s["same_history"] for s in per_step),
        "same_history_first_steps": [s["same_history"] for s in per_step[:4]],
        "distinct_masks_median": statistics.median(s["distinct_masks"] for s in per_step),
        "distinct_masks_first_steps": [s["distinct_masks"] for s in per_step[:4]],
        "work_saved_by_history_share": round(1 - sum(s["history_sum_us"] for s in per_step) / total, 3),
        "work_saved_by_ideal_state_share": round(1 - sum(s["distinct_sum_us"] for s in per_step) / total, 3),
        "finished_rows": sum(1 for h in hist_rows if h and h[-1] == comp.eos_token_id),
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
