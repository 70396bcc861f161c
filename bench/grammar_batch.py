"""One step's masks for a batch of constrained rows, through the engine's own path (``GrammarCompiler`` +
``structured.batch.fill_bitmasks``), llguidance vs xgrammar, on the 151,936-token byte-level BPE.

``--rows`` constraints (bench/structured.py's schema) are walked into a JSON string (where a random model
spends nearly all its tokens), then each step: ``fill_bitmasks`` for all rows into one host bitmask, then
every row accepts one more string token. Reported per library: median / p90 ms per step for the fill, and
for the accepts, and ``llguidance_over_xgrammar`` (fill + accept per step, since xgrammar computes a row's
next mask on a thread as its token is accepted).

    python bench/grammar_batch.py --tokenizer-dir .data/bpe151k --rows 128 --out bench/results/grammar_batch.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from structured import SCHEMA  # noqa: E402

from llmray.engine.structured import StructuredOutput  # noqa: E402
from llmray.engine.structured.batch import fill_bitmasks  # noqa: E402
from llmray.engine.structured.compiler import GrammarCompiler  # noqa: E402
from llmray.model.tokenizer import Tokenizer  # noqa: E402


def bench(comp: GrammarCompiler, tok: Tokenizer, backend: str, rows: int, steps: int) -> dict:
    spec = StructuredOutput(json=SCHEMA, backend=backend)
    t0 = time.perf_counter()
    cons = [comp.constraint(spec) for _ in range(rows)]
    setup_s = time.perf_counter() - t0
    start = tok.encode('{"title": "The')
    word = tok.encode(" word")[0]
    for c in cons:
        assert all(c.accept_token(t) for t in start)
    words = (comp.vocab_size + 31) // 32
    host = torch.full((rows, words), -1, dtype=torch.int32)
    fills, accepts = [], []
    for _ in range(steps):
        host.fill_(-1)
        t0 = time.perf_counter()
        failed = fill_bitmasks(host, list(enumerate(cons)))
        t1 = time.perf_counter()
        assert not failed, failed
        assert all(c.accept_token(word) for c in cons)
        t2 = time.perf_counter()
        fills.append((t1 - t0) * 1e3)
        accepts.append((t2 - t1) * 1e3)
    both = sorted(f + a for f, a in zip(fills, accepts, strict=True))
    fills.sort()
    return {
        "fill_ms_median": round(statistics.median(fills), 3),
        "fill_ms_p90": round(fills[int(0.9 * (len(fills) - 1))], 3),
        "accept_ms_median": round(statistics.median(accepts), 3),
        # xgrammar computes a row's next mask on a thread as its token is accepted: compare fill + accept
        "fill_plus_accept_ms_median": round(statistics.median(both), 3),
        "constraints_setup_s": round(setup_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer-dir", default=".data/bpe151k")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--libraries", default="llguidance,xgrammar")
    ap.add_argument("--device-name", default="")
    ap.add_argument("--out", default="bench/results/grammar_batch.json")
    args = ap.parse_args()
    tok = Tokenizer.load(args.tokenizer_dir)
    comp = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_id)
    out: dict = {
        "device": args.device_name or f"cpu ({os.cpu_count()} cores)",
        "cpu_count": os.cpu_count(),
        "rows": args.rows,
        "steps": args.steps,
        "vocab_size": tok.vocab_size,
        "schema": SCHEMA,
        "state": "inside the first JSON string value, one ' word' token accepted per step",
        "command": "python " + " ".join(sys.argv),
    }
    for lib in args.libraries.split(","):
        out[lib] = bench(comp, tok, lib, args.rows, args.steps)
        print(lib, out[lib], flush=True)
    if "llguidance" in out and "xgrammar" in out:
        key = "fill_plus_accept_ms_median"
        out["llguidance_over_xgrammar"] = round(out["llguidance"][key] / out["xgrammar"][key], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    comp.close()


if __name__ == "__main__":
    main()
