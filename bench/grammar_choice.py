"""Which grammar library: xgrammar vs llguidance, timed on our tokenizers (CPU, one thread of work).

For each tokenizer (a 151,936-token byte-level BPE trained on the Python standard library's sources, the
shape of Qwen3's vocabulary; a char-level tokenizer) and each schema: the cold compile time (fresh compiler,
no cache), and the per-token mask fill while a matcher walks through a valid document token by token
(fill the bitmask, then accept the document's next token), median and p99 over the document's tokens.
Writes bench/results/grammar_choice.json.

    python bench/grammar_choice.py [--tokenizer-dir .data/bpe151k]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmray.engine.structured.vocab import build_vocab  # noqa: E402
from llmray.model.tokenizer import Tokenizer, char_tokenizer  # noqa: E402

SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
                    "role": {"enum": ["admin", "editor", "viewer"]},
                },
                "required": ["name", "email", "role"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
            "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 100}},
        },
        "required": ["user", "tags", "scores"],
        "additionalProperties": False,
    },
    "tool_args": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and country"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "include": {"type": "array", "items": {"enum": ["wind", "rain", "uv"]}, "uniqueItems": True},
        },
        "required": ["location", "unit"],
        "additionalProperties": False,
    },
    "json_object": {"type": "object"},
}
DOCS = {
    "flat": {"name": "Ada Lovelace", "age": 36, "ok": True},
    "nested": {
        "user": {"name": "grace", "email": "grace@navy.com", "role": "admin"},
        "tags": ["compilers", "cobol", "navy"],
        "scores": [99.5, 87, 100],
    },
    "tool_args": {"location": "Paris, France", "unit": "celsius", "days": 3, "include": ["wind", "rain"]},
    "json_object": {"a": [1, 2, {"b": "c"}], "d": None, "e": "some longer text value here"},
}


def stats_us(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "median_us": round(statistics.median(xs) * 1e6, 2),
        "p99_us": round(xs[int(0.99 * (len(xs) - 1))] * 1e6, 2),
    }


def bench_xgrammar(tok: Tokenizer, vocab, vocab_size: int) -> dict:
    import xgrammar as xgr

    info = xgr.TokenizerInfo(
        vocab.tokens, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[tok.eos_token_id]
    )
    out = {}
    for name, schema in SCHEMAS.items():
        compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, max_whitespace_cnt=2)
        compile_s = time.perf_counter() - t0
        ids = tok.encode(json.dumps(DOCS[name], separators=(",", ":")))
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        fills, accepted = [], True
        for t in ids:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            fills.append(time.perf_counter() - t0)
            accepted &= matcher.accept_token(t)
        out[name] = {
            "compile_ms": round(compile_s * 1e3, 2),
            "tokens": len(ids),
            "all_accepted": accepted,
            **stats_us(fills),
        }
    return out


class _Wrap:
    """llguidance's TokenizerWrapper protocol over our token bytes."""

    def __init__(self, tok: Tokenizer, vocab) -> None:
        self.eos_token_id = tok.eos_token_id
        self.bos_token_id = None
        self.tokens = vocab.tokens
        self.special_token_ids = sorted(vocab.special_ids)
        self._tok = tok
        self.is_tokenizer_wrapper = True

    def __call__(self, s) -> list[int]:
        return self._tok.encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s)


def bench_llguidance(tok: Tokenizer, vocab, vocab_size: int) -> dict:
    import llguidance
    import llguidance.torch as llt

    out = {}
    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrap(tok, vocab)), n_vocab=vocab_size)
    setup_s = time.perf_counter() - t0
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_pattern": "[ \\n\\t]{0,2}"}
        )
        matcher = llguidance.LLMatcher(lltok, grammar)
        compile_s = time.perf_counter() - t0
        err = matcher.get_error() if matcher.is_error() else None
        ids = tok.encode(json.dumps(DOCS[name], separators=(",", ":")))
        bitmask = llt.allocate_token_bitmask(1, vocab_size)
        fills, accepted = [], True
        for t in ids:
            t0 = time.perf_counter()
            llt.fill_next_token_bitmask(matcher, bitmask, 0)
            fills.append(time.perf_counter() - t0)
            accepted &= matcher.consume_token(t)
        out[name] = {
            "compile_ms": round(compile_s * 1e3, 2),
            "tokens": len(ids),
            "all_accepted": accepted,
            "error": err,
            **stats_us(fills),
        }
    out["tokenizer_setup_ms"] = round(setup_s * 1e3, 1)
    return out


BATCH, STEPS = 64, 40


def _walk_step(bitmask: torch.Tensor, rows: int, vocab_size: int, gen: torch.Generator) -> list[int]:
    """One uniformly random allowed token per row (a random-weight model under the mask)."""
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask[:rows, :, None] >> shifts) & 1).flatten(1)[:, :vocab_size].float()
    return torch.multinomial(allowed + 1e-30 * (allowed.sum(1, keepdim=True) == 0), 1, generator=gen)[
        :, 0
    ].tolist()


def batch_fill(lib: str, tok: Tokenizer, vocab, vocab_size: int, schema: dict, threads: int) -> dict:
    """BATCH matchers walking random valid paths: the time of one parallel bitmask fill of all rows."""
    gen = torch.Generator().manual_seed(0)
    if lib == "xgrammar":
        import xgrammar as xgr

        info = xgr.TokenizerInfo(
            vocab.tokens, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[tok.eos_token_id]
        )
        compiled = xgr.GrammarCompiler(info, max_threads=threads).compile_json_schema(
            json.dumps(schema), any_whitespace=True, max_whitespace_cnt=2
        )
        ms = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
        batch = xgr.BatchGrammarMatcher(max_threads=threads)
        fill = lambda bm: batch.batch_fill_next_token_bitmask(ms, bm)  # noqa: E731
        accept = lambda i, t: ms[i].accept_token(t)  # noqa: E731
        done = lambda i: ms[i].is_terminated()  # noqa: E731
    else:
        import llguidance
        import llguidance.torch as llt

        lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrap(tok, vocab)), n_vocab=vocab_size)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_pattern": "[ \\n\\t]{0,2}"}
        )
        ms = [llguidance.LLMatcher(lltok, grammar) for _ in range(BATCH)]
        ex = llguidance.LLExecutor(num_threads=threads)
        fill = lambda bm: llt.fill_next_token_bitmask_par(ex, [(m, i) for i, m in enumerate(ms)], bm)  # noqa: E731
        accept = lambda i, t: ms[i].consume_token(t)  # noqa: E731
        done = lambda i: ms[i].is_stopped()  # noqa: E731
    bm = torch.full((BATCH, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        fill(bm)
        times.append(time.perf_counter() - t0)
        for i, t in enumerate(_walk_step(bm, BATCH, vocab_size, gen)):
            accept(i, t)
            if done(i):
                ms[i].reset()  # a finished document: start the next one
    return {
        "rows": BATCH,
        "threads": threads,
        **{k.replace("_us", "_ms"): round(v / 1e3, 3) for k, v in stats_us(times).items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer-dir", default=".data/bpe151k")
    ap.add_argument("--out", default="bench/results/grammar_choice.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    toks = {"bpe_151936": Tokenizer.load(args.tokenizer_dir)}
    corpus = "".join(json.dumps(d) for d in DOCS.values()) + "abcdefghijklmnopqrstuvwxyz0123456789 .,\n"
    toks["char"] = char_tokenizer(corpus)
    result = {"device": "cpu (2 cores, shared)", "tokenizers": {}}
    for tname, tok in toks.items():
        vocab = build_vocab(tok)
        n = tok.vocab_size
        entry = {"vocab_size": n, "vocab_kind": vocab.kind}
        for lib, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            entry[lib] = fn(tok, vocab, n)
            for sname in ("nested", "json_object"):
                entry[lib][f"batch_fill_{sname}"] = batch_fill(lib, tok, vocab, n, SCHEMAS[sname], threads=2)
        result["tokenizers"][tname] = entry
        print(json.dumps({tname: entry}, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
