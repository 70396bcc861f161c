"""Grammar-constrained decoding without a model: token bytes of each tokenizer kind, specs, compilation limits,
and random walks under the mask (a random-weight model samples like this) that must give valid documents."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmray.engine.structured import StructuredOutput
from llmray.engine.structured.compiler import GrammarCompiler, unpack_bitmask
from llmray.engine.structured.spec import MAX_SPEC_BYTES
from llmray.engine.structured.vocab import build_vocab
from llmray.model.tokenizer import SPECIAL_TOKENS, Tokenizer, char_tokenizer, train_bpe

CORPUS = (Path(__file__).parents[1] / "_support" / "tokenizer_corpus.txt").read_text()
JSON_CHARS = '{}[]":,-.0123456789 \n\tabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_@'

NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 12},
                "role": {"enum": ["admin", "editor", "viewer"]},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
            },
            "required": ["name", "role", "age"],
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["user", "tags", "active"],
}
SHORT = {  # every valid document is short: enums, booleans, a bounded array
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["color", "ok", "flags"],
    "additionalProperties": False,
}


def metaspace_bpe(text: str) -> Tokenizer:
    """A SentencePiece-style BPE (Metaspace, byte fallback), as Llama/Mistral tokenizer.json files are."""
    backend = HFTokenizer(models.BPE(byte_fallback=True, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS + byte_tokens, initial_alphabet=list(JSON_CHARS + "▁")
    )
    backend.train_from_iterator([text] * 2, trainer=trainer)
    return Tokenizer(backend, {"eos_token": "<|endoftext|>"})


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {
        "byte_level": train_bpe([CORPUS] * 4, vocab_size=400),
        "metaspace": metaspace_bpe(CORPUS),
        "char": char_tokenizer(CORPUS + JSON_CHARS),
    }


@pytest.fixture(scope="module")
def compilers(tokenizers) -> dict[str, GrammarCompiler]:
    # a model vocabulary padded past the tokenizer's (as Qwen3's 151,936 > 151,669)
    return {k: GrammarCompiler(t, t.vocab_size + 13, t.eos_token_id) for k, t in tokenizers.items()}


def walk(compiler: GrammarCompiler, spec: StructuredOutput, seed: int, max_tokens: int = 400) -> list[int]:
    """Sample uniformly among the allowed tokens until the grammar terminates (a random model)."""
    c = compiler.constraint(spec)
    gen = torch.Generator().manual_seed(seed)
    bitmask = torch.zeros((1, (compiler.vocab_size + 31) // 32), dtype=torch.int32)
    ids: list[int] = []
    while not c.is_terminated():
        assert len(ids) < max_tokens, "the grammar did not terminate"
        c.fill_bitmask(bitmask, 0)
        allowed = unpack_bitmask(bitmask[0], compiler.vocab_size).float()
        assert allowed.sum() > 0, "dead end: no token allowed"
        token = int(torch.multinomial(allowed, 1, generator=gen))
        assert c.accept_token(token)
        ids.append(token)
    return ids


def text_of(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode([t for t in ids if t != tok.eos_token_id])


@pytest.mark.parametrize("kind", ["byte_level", "metaspace", "char"])
def test_token_bytes_spell_the_text(tokenizers, kind):
    tok = tokenizers[kind]
    vocab = build_vocab(tok)
    assert vocab.kind == ("raw" if kind == "char" else kind)
    text = 'Say {"a": [1, 2.5, "x y"]} and naïve café\n\tend'
    if kind == "char":
        text = "".join(c for c in text if tok.backend.token_to_id(c) is not None)
    ids = tok.encode(text)
    assert vocab.text_bytes(ids).decode("utf-8").lstrip() == tok.decode(ids).lstrip()
    assert vocab.tokens[tok.eos_token_id] == b""  # special tokens are never part of a document


@pytest.mark.parametrize(
    "kind,backend",
    [("byte_level", "auto"), ("metaspace", "auto"), ("char", "auto"), ("byte_level", "xgrammar")],
)
def test_random_walks_validate_against_the_schema(tokenizers, compilers, kind, backend):
    spec = StructuredOutput(json=NESTED, backend=backend)
    for seed in range(3):
        ids = walk(compilers[kind], spec, seed)
        assert ids[-1] == tokenizers[kind].eos_token_id  # finished by the stop token once complete
        jsonschema.validate(json.loads(text_of(tokenizers[kind], ids)), NESTED)


@pytest.mark.parametrize("kind", ["byte_level", "char"])
def test_short_schema_finishes_within_120_tokens(tokenizers, compilers, kind):
    for seed in range(5):
        ids = walk(compilers[kind], StructuredOutput(json=SHORT), seed)
        assert len(ids) <= 120
        jsonschema.validate(json.loads(text_of(tokenizers[kind], ids)), SHORT)


def test_whitespace_is_bounded(tokenizers, compilers):
    """At most 2 whitespace characters per gap: no run of 3 anywhere in any document."""
    for seed in range(5):
        text = text_of(tokenizers["char"], walk(compilers["char"], StructuredOutput(json_object=True), seed))
        assert isinstance(json.loads(text), dict)
        run = 0
        in_string = False
        for i, ch in enumerate(text):
            if ch == '"' and (i == 0 or text[i - 1] != "\\"):
                in_string = not in_string
            run = run + 1 if (ch in " \n\t\r" and not in_string) else 0
            assert run <= 2, text


def test_regex_choice_and_affixes(tokenizers, compilers):
    tok, comp = tokenizers["byte_level"], compilers["byte_level"]
    spec = StructuredOutput(regex=r"[a-c]{2}-\d{3}", prefix="<tool_call>\n", suffix="\n</tool_call>")
    for seed in range(3):
        text = text_of(tok, walk(comp, spec, seed))
        assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
        core = text[len("<tool_call>\n") : -len("\n</tool_call>")]
        assert len(core) == 6 and core[2] == "-" and core[3:].isdigit()
    seen = {text_of(tok, walk(comp, StructuredOutput(choice=["alpha", "beta"]), s)) for s in range(6)}
    assert seen <= {"alpha", "beta"} and seen


def test_bad_specs_are_value_errors_naming_the_problem(compilers):
    comp = compilers["byte_level"]
    with pytest.raises(ValueError, match="structured_output.json.*nope"):
        comp.constraint(StructuredOutput(json={"type": "object", "properties": {"a": {"$ref": "#/nope"}}}))
    with pytest.raises(ValueError, match="uniqueItems.*properties.x"):
        comp.constraint(StructuredOutput(json={"properties": {"x": {"type": "array", "uniqueItems": True}}}))
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutput(json="{nope")
    with pytest.raises(ValueError, match="larger than the limit"):
        StructuredOutput(json={"enum": ["x" * 100] * (MAX_SPEC_BYTES // 100)})
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput(json={"type": "object"}, regex="a+")
    with pytest.raises(ValueError, match="structured_output.regex"):
        comp.constraint(StructuredOutput(regex="(unclosed"))
    with pytest.raises(ValueError, match="structured_output.grammar"):
        comp.constraint(StructuredOutput(grammar="root ::= missing_rule"))


def test_cache_and_time_limit(tokenizers):
    tok = tokenizers["byte_level"]
    comp = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_id)
    spec = StructuredOutput(json=NESTED)
    comp.constraint(spec)
    comp.constraint(StructuredOutput(json=json.dumps(NESTED)))  # same schema as text: the same cache entry
    assert comp.num_compiles == 1
    comp.compile_timeout_s = 0.0  # the worker thread has not even started when the wait gives up
    with pytest.raises(ValueError, match="did not compile within"):
        comp.constraint(StructuredOutput(json=SHORT))
    with pytest.raises(ValueError, match="did not compile within"):  # the failure is cached
        comp.constraint(StructuredOutput(json=SHORT))
    comp.close()


def test_vocabulary_that_cannot_write_json_is_refused():
    tok = char_tokenizer(
        "abc xyz", base_chars=""
    )  # no '{' among its tokens: only leading whitespace could be written
    comp = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_id)
    with pytest.raises(ValueError, match="no token that can start"):
        comp.constraint(StructuredOutput(json_object=True))


def test_spec_is_hashable_picklable_and_canonical():
    import pickle

    a = StructuredOutput(json={"b": 1, "a": 2})
    b = StructuredOutput.from_dict({"json": '{"b": 1,  "a": 2}'})
    assert a.key == b.key and a == pickle.loads(pickle.dumps(a))
    # property order is kept (documents follow it), so another order is another grammar
    assert StructuredOutput(json={"a": 2, "b": 1}).key != a.key
    with pytest.raises(ValueError, match="unknown keys"):
        StructuredOutput.from_dict({"json_schema": {}})


def test_masks_prefetched_on_worker_threads_equal_inline_ones(tokenizers, compilers):
    tok = tokenizers["byte_level"]
    inline = GrammarCompiler(tok, tok.vocab_size + 13, tok.eos_token_id, fill_threads=0)
    spec = StructuredOutput(json=NESTED, backend="xgrammar")
    assert compilers["byte_level"].fill_threads > 0
    for seed in range(2):
        assert walk(inline, spec, seed) == walk(compilers["byte_level"], spec, seed)


def test_each_kind_names_its_library_explicitly():
    assert [
        StructuredOutput(**{k: v}).library for k, v in [("json", {}), ("regex", "a"), ("choice", ["a"])]
    ] == ["llguidance"] * 3
    assert StructuredOutput(json_object=True).library == "llguidance"
    assert StructuredOutput(grammar='root ::= "a"').library == "xgrammar"  # the EBNF dialect we document
    assert StructuredOutput(json={}, backend="xgrammar").library == "xgrammar"
    assert StructuredOutput(json={}).key != StructuredOutput(json={}, backend="xgrammar").key  # cached apart
    with pytest.raises(ValueError, match="backend must be one of"):
        StructuredOutput(json={}, backend="outlines")


def test_regex_digits_are_ascii_in_both_libraries(tokenizers, compilers):
    """llguidance's regexes are Rust's (Unicode \\d); ours mean [0-9] as xgrammar and JSON schema do."""
    tok, comp = tokenizers["char"], compilers["char"]
    for backend in ("llguidance", "xgrammar"):
        c = comp.constraint(StructuredOutput(regex=r"\d\w", backend=backend))
        mask = torch.zeros((1, (comp.vocab_size + 31) // 32), dtype=torch.int32)
        c.fill_bitmask(mask, 0)
        allowed = {
            tok.decode([i]) for i in unpack_bitmask(mask[0], comp.vocab_size).nonzero().flatten().tolist()
        }
        assert allowed and allowed <= set("0123456789"), (backend, allowed)


class _Broken:
    def fill_bitmask(self, bitmask, row):
        raise RuntimeError("broken")


def test_one_call_fills_a_steps_rows_like_row_by_row(tokenizers, compilers):
    from llmray.engine.structured.batch import fill_bitmasks

    tok, comp = tokenizers["byte_level"], compilers["byte_level"]
    words = (comp.vocab_size + 31) // 32
    prefixes = [
        '{"user": {"name": "ab',
        '{"user": {"name": "x", "role": "',
        '{"user": {"name": "x", "role": "admin", "age',
    ]
    rows = []
    for i, p in enumerate(prefixes):
        c = comp.constraint(StructuredOutput(json=NESTED))
        assert all(c.accept_token(t) for t in tok.encode(p))
        rows.append((2 * i, c))
    xg = comp.constraint(StructuredOutput(json=NESTED, backend="xgrammar"))  # no batch API: filled per row
    rows += [(1, xg), (3, _Broken())]
    batch = torch.full((7, words), -1, dtype=torch.int32)
    failed = fill_bitmasks(batch, rows)
    assert list(failed) == [3] and "broken" in failed[3]
    for r, c in rows[:-1]:
        one = torch.full((1, words), -1, dtype=torch.int32)
        c.fill_bitmask(one, 0)
        assert torch.equal(batch[r], one[0]), r
    assert bool((batch[5] == -1).all()) and bool(
        (batch[6] == -1).all()
    )  # rows without a constraint: untouched


def test_a_requests_extra_stop_token_ends_the_document(tokenizers, compilers):
    tok, comp = tokenizers["byte_level"], compilers["byte_level"]
    stop = tok.encode("Z")[0]
    c = comp.constraint(StructuredOutput(choice=["alpha", "beta"]), extra_stop_token_ids=[stop])
    mask = torch.zeros((1, (comp.vocab_size + 31) // 32), dtype=torch.int32)
    c.fill_bitmask(mask, 0)
    assert not bool(unpack_bitmask(mask[0], comp.vocab_size)[stop])  # not before the document is complete
    assert all(c.accept_token(t) for t in tok.encode("beta")) and not c.is_terminated()
    c.fill_bitmask(mask, 0)
    allowed = unpack_bitmask(mask[0], comp.vocab_size)
    assert bool(allowed[stop]) and bool(allowed[tok.eos_token_id])
    assert c.accept_token(stop) and c.is_terminated()


@pytest.mark.parametrize("final", [True, False])
def test_the_mask_worker_signals_once_every_row_is_final(tokenizers, compilers, final):
    # the host flag (structured/mask_worker.py): with ``final`` the worker stores it as soon as the fill returns
    # (every row written: filled, or all ones where the sampled token ended or was rejected), before the
    # checks that report failed rows; a work that breaks stores it only after its rows are reset
    import numpy as np

    from llmray.engine.structured.llguidance_backend import LLGuidanceConstraint
    from llmray.engine.structured.mask_worker import run_job

    tok, comp = tokenizers["byte_level"], compilers["byte_level"]
    words = (comp.vocab_size + 31) // 32
    cons = []
    for _ in range(3):
        c = comp.constraint(StructuredOutput(json=NESTED))
        assert all(c.accept_token(t) for t in tok.encode('{"user": {"name": "x", "role": "'))
        cons.append(c)
    ok, bad = tok.encode("admin")[0], tok.encode("9")[0]
    work, check = LLGuidanceConstraint.fill_job([(c, i) for i, c in enumerate(cons)], list(enumerate(cons)))
    flag = np.zeros(1, dtype=np.int32)
    seen: list[int] = []

    def spy(host, res):
        seen.append(int(flag[0]))
        return check(host, res)

    host = torch.zeros((3, words), dtype=torch.int32)
    toks = np.array([ok, bad, tok.eos_token_id])
    out, _, _, failed = run_job(
        [work], host, lambda: toks, None, [(spy, list(enumerate(cons)))], (flag, 7), final
    )
    assert seen == [7 if final else 0] and int(flag[0]) == 7
    assert list(failed) == [1, 2] and "rejected" in failed[1]
    assert bool((host[1] == -1).all()) and bool((host[2] == -1).all())
    one = torch.zeros((1, words), dtype=torch.int32)
    cons[0].fill_bitmask(one, 0)
    assert torch.equal(host[0], one[0])

    def boom(host, tokens):
        raise RuntimeError("broken")

    flag[0], host[:] = 0, 0
    _, _, _, failed = run_job(
        [boom], host, lambda: toks, None, [(check, list(enumerate(cons)))], (flag, 8), final
    )
    assert sorted(failed) == [0, 1, 2] and int(flag[0]) == 8 and bool((host == -1).all())
