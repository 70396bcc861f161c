"""Structured outputs at batch scale: 256 concurrent requests on Qwen3-0.6B shapes, half of them carrying a
JSON schema, against the same batch with no schemas (``LLM.generate``, random weights, bf16).

The tokenizer is a 151,936-token byte-level BPE (trained on the Python standard library's sources by
``bench/grammar_choice.py``'s recipe; ``--tokenizer`` points at it, or at a ``.tar.xz`` of it), so masks are
computed over a vocabulary of Qwen3's size and kind. Free rows sample with ``ignore_eos`` to
``--max-tokens``; the schema keeps constrained rows going as long (an array of at least 8 strings), so both
batches hold 256 rows for the whole run and the ratio measures the cost of constraining, not shorter
answers. Runs alternate free / half / free / half ... (``--runs`` each) after a warm-up that compiles the
grammar. Reported: output tok/s per run, ``half_schema_over_free`` (median over median), the share of
constrained outputs that parse and validate (those that finished "stop") and the same ratio with masks
computed inline (no worker threads) as ``half_schema_over_free_inline``.

    python bench/structured.py --tokenizer .data/bpe151k.tar.xz --out bench/results/structured.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmray.config import ModelConfig  # noqa: E402
from llmray.engine.llm import LLM  # noqa: E402
from llmray.engine.sampling_params import SamplingParams  # noqa: E402
from llmray.model.qwen3 import Qwen3ForCausalLM  # noqa: E402
from llmray.model.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "rating": {"enum": ["low", "mid", "high"]},
        "notes": {"type": "array", "items": {"type": "string"}, "minItems": 8},
    },
    "required": ["title", "rating", "notes"],
    "additionalProperties": False,
}


def load_tokenizer(path: str) -> Tokenizer:
    p = Path(path)
    if p.suffix == ".xz":
        out = Path(tempfile.mkdtemp())
        with tarfile.open(p) as tar:
            tar.extractall(out, filter="data")
        p = next(out.iterdir())
    return Tokenizer.load(p)


def build_llm(tok: Tokenizer, preset: str) -> LLM:
    """Random weights of ``preset`` in memory (no checkpoint write), our tokenizer."""
    base = ModelConfig.preset(preset)
    vocab = max(base.vocab_size, tok.vocab_size)  # qwen3-0.6b: 151,936 = our tokenizer's size
    cfg = base.replace(
        vocab_size=vocab, eos_token_id=tok.eos_token_id, bos_token_id=None, max_position_embeddings=4096
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(cfg, kernels="torch")
    return LLM.from_model(model, tokenizer=tok)


def timed(llm: LLM, prompts: list, params: list) -> tuple[float, list]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / dt, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=".data/bpe151k.tar.xz")
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="bench/results/structured.json")
    args = ap.parse_args()
    import jsonschema

    tok = load_tokenizer(args.tokenizer)
    llm = build_llm(tok, args.preset)
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(300, tok.vocab_size - 10, (args.prompt_len,), generator=gen).tolist()
        for _ in range(args.num)
    ]

    def params(i: int, schema: bool) -> SamplingParams:
        kw = {"structured_output": {"json": SCHEMA}} if schema else {"ignore_eos": True}
        return SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i, **kw)

    free = [params(i, False) for i in range(args.num)]
    half = [params(i, i % 2 == 1) for i in range(args.num)]
    t0 = time.perf_counter()
    w = min(8, args.num)
    llm.generate(prompts[:w], [params(i, i % 2 == 1) for i in range(w)])  # warm-up: kernels, grammar compile
    warm_s = time.perf_counter() - t0
    res: dict = {"free": [], "half": [], "half_inline": []}
    outs_half: list = []
    for _ in range(args.runs):
        res["free"].append(timed(llm, prompts, free)[0])
        tps, outs_half = timed(llm, prompts, half)
        res["half"].append(tps)
    compiler = llm.engine._grammars
    pool, compiler._fill_pool = compiler._fill_pool, None  # masks computed inline in fill_bitmask
    for _ in range(max(1, args.runs - 1)):
        res["half_inline"].append(timed(llm, prompts, half)[0])
    compiler._fill_pool = pool
    constrained = [o for i, o in enumerate(outs_half) if i % 2 == 1]
    valid = 0
    for o in constrained:
        if o.finish_reason == "stop":
            try:
                jsonschema.validate(json.loads(o.text), SCHEMA)
                valid += 1
            except (json.JSONDecodeError, jsonschema.ValidationError):
                pass
    stopped = sum(o.finish_reason == "stop" for o in constrained)
    med = {k: statistics.median(v) for k, v in res.items()}
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "half_schema_over_free": round(med["half"] / med["free"], 3),
        "half_schema_over_free_inline": round(med["half_inline"] / med["free"], 3),
        "free_tok_s": [round(x) for x in res["free"]],
        "half_schema_tok_s": [round(x) for x in res["half"]],
        "half_schema_inline_tok_s": [round(x) for x in res["half_inline"]],
        "constrained_finished_stop": stopped,
        "constrained_stop_valid": valid,
        "constrained_mean_tokens": round(statistics.mean(len(o.token_ids) for o in constrained), 1),
        "grammar_fill_threads": compiler.fill_threads,
        "warmup_s": round(warm_s, 1),
        "requests": args.num,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "vocab_size": tok.vocab_size,
        "schema": SCHEMA,
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
