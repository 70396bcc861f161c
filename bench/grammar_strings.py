"""Mask cost inside JSON strings, xgrammar vs llguidance, on the 151,936-token byte-level BPE (CPU).

``bench/structured.py`` spends nearly all constrained tokens inside strings (a random model writes long
strings); this times ``fill_next_token_bitmask`` at three states of its schema (inside a string value,
inside an array item string, before an array item), 100 fills each, and writes
bench/results/grammar_strings.json. Needs ``pip install llguidance`` (not a dependency).

    python bench/grammar_strings.py --tokenizer-dir .data/bpe151k
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grammar_choice import _Wrap  # noqa: E402
from structured import SCHEMA  # noqa: E402

from llmray.engine.structured.vocab import build_vocab  # noqa: E402
from llmray.model.tokenizer import Tokenizer  # noqa: E402

STATES = [
    '{"title": "abc',
    '{"title": "x", "rating": "low", "notes": ["a',
    '{"title": "x", "rating": "low", "notes": [',
]


def main() -> None:
    import llguidance
    import llguidance.torch as llt
    import xgrammar as xgr

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer-dir", default=".data/bpe151k")
    ap.add_argument("--out", default="bench/results/grammar_strings.json")
    args = ap.parse_args()
    tok = Tokenizer.load(args.tokenizer_dir)
    n_vocab = tok.vocab_size
    vocab = build_vocab(tok)
    info = xgr.TokenizerInfo(
        vocab.tokens, xgr.VocabType.RAW, vocab_size=n_vocab, stop_token_ids=[tok.eos_token_id]
    )
    compiled = xgr.GrammarCompiler(info, max_threads=2).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=True, max_whitespace_cnt=2
    )
    lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrap(tok, vocab)), n_vocab=n_vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_pattern": "[ \\n\\t]{0,2}"}
    )
    rows = []
    for prefix in STATES:
        ids = tok.encode(prefix)
        xm = xgr.GrammarMatcher(compiled)
        lm = llguidance.LLMatcher(lltok, grammar)
        assert all(xm.accept_token(t) for t in ids) and all(lm.consume_token(t) for t in ids)
        bx = torch.zeros((1, (n_vocab + 31) // 32), dtype=torch.int32)
        bl = bx.clone()
        t0 = time.perf_counter()
        for _ in range(100):
            xm.fill_next_token_bitmask(bx, 0)
        t1 = time.perf_counter()
        for _ in range(100):
            llt.fill_next_token_bitmask(lm, bl, 0)
        t2 = time.perf_counter()
        rows.append(
            {
                "state": prefix,
                "xgrammar_us": round((t1 - t0) * 1e4, 1),
                "llguidance_us": round((t2 - t1) * 1e4, 1),
                "same_mask": bool(torch.equal(bx, bl)),
            }
        )
        print(rows[-1], flush=True)
    out = {"device": "cpu (2 cores, shared)", "vocab_size": n_vocab, "schema": SCHEMA, "states": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
