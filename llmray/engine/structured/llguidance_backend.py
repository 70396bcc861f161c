"""The llguidance backend: a spec's grammar over the engine's vocabulary, and its per-request matcher.

``LLGuidanceBackend(tokenizer, tokens, vocab_size, eos_token_id)`` is built by ``GrammarCompiler`` the first time
a spec asks for llguidance (llguidance is imported then; building its token trie over a 151,936-token vocabulary
takes about a second). ``compile`` builds one pristine ``LLMatcher`` per spec (the compiler caches it);
``constraint`` deep-copies it (microseconds) into a fresh ``LLGuidanceConstraint``.

Masks: ``LLGuidanceConstraint.fill_bitmasks(bitmask, rows)`` fills every llguidance row of a step in ONE call
(``LLExecutor``: parallel threads, no GIL) straight into the step's host bitmask; ``fill_bitmask`` fills one row.
Both write through llguidance's pointer API (``llguidance.torch`` is not imported: importing it runs
``torch.compile``'s import of dynamo, 5-20 s).
llguidance's mask inside JSON strings costs 15-40 µs on a 151,936-token vocabulary where xgrammar's costs
490-700 µs (bench/results/grammar_strings.json), which is why ``auto`` picks it for JSON, regex and choice.

Stop tokens: the engine's EOS is llguidance's end of sequence (allowed once the grammar accepts, which then
stops). A request's extra stop tokens (``stop_token_ids``) are allowed by this module on top of the mask
whenever the grammar accepts, and taking one finishes the document as EOS does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from llmray.engine.structured.batch import usable_cpus
from llmray.engine.structured.schema_rules import ascii_classes, closed_objects
from llmray.engine.structured.spec import StructuredOutput

# the mask executor's threads at most: on the H200 host (16 CPUs) a 128-row fill took 4.7 ms on 4 threads vs
# 5.6-6.6 on llguidance's default 12, and a batch ran 0.443x vs 0.399x of the free batch (bench/results/
# structured.json, structured_profile.json): the slowest masks bound the fill, more threads contend
MAX_FILL_THREADS = 4


def fill_threads() -> int:
    """The mask executor's threads: 4/5 of the CPUs this process may use (its affinity), 1 to
    ``MAX_FILL_THREADS`` (a step's fill is bound by its few slow rows, bench/grammar_states.py)."""
    return max(1, min(MAX_FILL_THREADS, usable_cpus() * 4 // 5))


class _Wrapper:
    """llguidance's ``TokenizerWrapper`` protocol over our token bytes (special tokens are ``b""``).

    llguidance tokenizes text the grammar forces and allows only those tokens then, so a tokenization must
    spell exactly the given bytes: the tokenizer's own when it does (byte-level BPE), else greedy longest
    match over the token bytes (a Metaspace tokenizer prepends a space to what it encodes)."""

    def __init__(
        self, tokenizer: Any, tokens: list[bytes], eos_token_id: int, special_ids: list[int]
    ) -> None:
        self.eos_token_id = eos_token_id
        self.bos_token_id = None
        self.tokens = tokens
        self.special_token_ids = special_ids
        self.is_tokenizer_wrapper = True
        self._tok = tokenizer
        self._ids: dict[bytes, int] = {}
        for i, t in enumerate(tokens):
            if t:
                self._ids.setdefault(t, i)
        self._longest = max((len(t) for t in self._ids), default=1)
        self._cache: dict[bytes, tuple[int, ...]] = {}

    def _greedy(self, data: bytes) -> list[int]:
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                tid = self._ids.get(data[i : i + n])
                if tid is not None:
                    out.append(tid)
                    i += n
                    break
            else:
                i += 1  # a byte no token spells: it cannot be written anyway
        return out

    def __call__(self, s: bytes | str) -> list[int]:
        data = s if isinstance(s, bytes) else s.encode("utf-8")
        hit = self._cache.get(data)  # forced texts (a schema's keys) repeat across requests and steps
        if hit is None:
            hit = self._encode(data)
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[data] = hit
        return list(hit)

    def _encode(self, data: bytes) -> tuple[int, ...]:
        try:  # never raise: llguidance calls this from Rust and panics on an exception
            ids = self._tok.encode(data.decode("utf-8", "replace"))
        except Exception:
            return tuple(self._greedy(data))
        if b"".join(self.tokens[i] if 0 <= i < len(self.tokens) else b"?" for i in ids) == data:
            return tuple(ids)
        return tuple(self._greedy(data))


class LLGuidanceConstraint:
    """One request's grammar state (the ``TokenConstraint`` protocol) on an ``LLMatcher``."""

    backend = "llguidance"
    fills_whole_row = True  # its fill writes every word of the row (structured/batch.py skips the reset)

    def __init__(self, matcher: Any, executor: Any, eos_token_id: int, extra_stops: list[int]) -> None:
        self.matcher = matcher
        self.executor = executor
        self.eos_token_id = eos_token_id
        self.extra_stops = extra_stops  # the request's stop tokens beyond EOS
        self.num_accepted = 0
        self._terminated = False
        # the tokens that end the document (EOS; extra stops once the grammar accepts): the step masks' worker
        # consumes a row's token itself, and the read-back then only checks it against these (step_masks.py)
        self.end_tokens = frozenset((eos_token_id, *extra_stops))

    def _add_stops(self, bitmask: torch.Tensor, row: int) -> None:
        if self.extra_stops and self.matcher.is_accepting():
            for t in self.extra_stops:
                bitmask[row, t // 32] |= _bit(t)

    def _check(self) -> None:
        if self.matcher.is_error():
            raise RuntimeError(f"llguidance: {self.matcher.get_error()}")

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens of this request into ``bitmask[row]`` (int32, 1 bit per token)."""
        v = bitmask[row]
        assert bitmask.dtype == torch.int32 and not bitmask.is_cuda and v.is_contiguous(), "host int32 rows"
        self.matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * 4)  # GIL released while it runs
        self._check()
        self._add_stops(bitmask, row)

    @classmethod
    def fill_bitmasks(
        cls, bitmask: torch.Tensor, rows: list[tuple[int, LLGuidanceConstraint]]
    ) -> dict[int, str]:
        """Fill ``bitmask[r]`` for every ``(r, constraint)`` in one call per executor (parallel threads,
        GIL released). ``bitmask``: contiguous host int32 (R, ceil(V/32)). Returns row -> why, for rows whose
        matcher is in an error state (their row is left for the caller to reset)."""
        assert bitmask.dtype == torch.int32 and not bitmask.is_cuda and bitmask.is_contiguous(), "host int32"
        by_executor: dict[int, list[tuple[int, LLGuidanceConstraint]]] = {}
        for r, c in rows:
            by_executor.setdefault(id(c.executor), []).append((r, c))
        for group in by_executor.values():
            group[0][1].executor.unsafe_compute_mask_ptr(
                [(c.matcher, r) for r, c in group], bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0]
            )
        failed: dict[int, str] = {}
        for r, c in rows:
            if c.matcher.is_error():
                failed[r] = f"llguidance: {c.matcher.get_error()}"
            else:
                c._add_stops(bitmask, r)
        return failed

    @classmethod
    def fill_job(
        cls,
        accepts: list[tuple[LLGuidanceConstraint, int]],
        rows: list[tuple[int, LLGuidanceConstraint]],
    ) -> tuple[
        Callable[[torch.Tensor, Callable[[], Any]], set[int]],
        Callable[[torch.Tensor, set[int]], dict[int, str]],
    ]:
        """A step's accepts and masks split for a worker thread (structured/step_masks.py); reusable for the next
        step of the same rows. ``work(bitmask, tokens)`` gets the previous step's sampled tokens from
        ``tokens()`` (it may block until they land: the GIL is released meanwhile), consumes ``tokens[i]`` into
        each ``(constraint, i)`` of ``accepts``, then fills ``bitmask[k]`` (host int32 (R, W), contiguous) for
        each ``(k, constraint)`` of ``rows`` — two calls into llguidance per executor, the GIL released inside
        both, their argument lists built here beforehand so that the worker barely needs the GIL — and returns
        the ids of the constraints that rejected their token. A row whose token ends its document (EOS, a
        request's stop token: that one is not consumed) or was rejected is set to all ones, not filled (its
        request finishes or fails; the sample is discarded), so every row is final when ``work`` returns
        (a matcher that breaks inside the fill writes an EOS-only mask). ``check(bitmask, rejected)``, on the
        caller's thread once ``work`` is done, returns packed row -> why (matchers in an error state) and adds
        the extra stop tokens (the only change it makes to the masks)."""
        index = {id(c): i for c, i in accepts}
        # per executor: its consumes (constraints, their token rows) and fills ((matcher, packed row), token row)
        groups: dict[int, tuple[Any, list, list, list, list]] = {}
        for c, i in accepts:
            g = groups.setdefault(id(c.executor), (c.executor, [], [], [], []))
            g[1].append(c)
            g[2].append(i)
        for k, c in rows:
            g = groups.setdefault(id(c.executor), (c.executor, [], [], [], []))
            g[3].append((c.matcher, k))
            g[4].append(index.get(id(c), -1))
        # the token rows as index arrays and the matchers of the consumes: the worker gathers with numpy
        gathers = {
            key: (np.asarray(g[2], dtype=np.int64), [c.matcher for c in g[1]]) for key, g in groups.items()
        }
        eos = rows[0][1].eos_token_id if rows else -1
        extra = any(c.extra_stops for c, _ in accepts)
        stop_rows = [(k, c) for k, c in rows if c.extra_stops]

        def work(bitmask: torch.Tensor, tokens: Callable[[], Any]) -> set[int]:
            ptr, row_bytes, n = bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0]
            toks = np.asarray(tokens()) if accepts else np.zeros(0, dtype=np.int64)
            rejected: set[int] = set()
            for key, (ex, cons, idx, fills, fidx) in groups.items():
                at, matchers = gathers[key]
                picked = toks[at]
                sampled = picked.tolist()
                pairs: list = []
                if not extra and not (picked == eos).any():  # (the norm): every row consumes its token
                    ended: set[int] = set()
                    if sampled:
                        oks = ex.consume_token_par(list(zip(matchers, sampled, strict=True)))
                        if not all(oks):
                            rejected.update(id(c) for c, ok in zip(cons, oks, strict=True) if not ok)
                elif extra:  # a request's own stop token ends it unconsumed
                    ended = {
                        i
                        for i, t, c in zip(idx, sampled, cons, strict=True)
                        if t == eos or t in c.extra_stops
                    }
                    pairs = [
                        (c, t)
                        for c, t in zip(cons, sampled, strict=True)
                        if t == eos or t not in c.extra_stops
                    ]
                else:
                    ended = {i for i, t in zip(idx, sampled, strict=True) if t == eos}
                    pairs = list(zip(cons, sampled, strict=True))
                if pairs:
                    oks = ex.consume_token_par([(c.matcher, t) for c, t in pairs])
                    if not all(oks):
                        rejected.update(id(c) for (c, _), ok in zip(pairs, oks, strict=True) if not ok)
                if ended or rejected:
                    bad = {id(c.matcher) for c in cons if id(c) in rejected}
                    rows_np = bitmask.numpy()  # (no torch op on an inference tensor on this thread)
                    keep = []
                    for a, i in zip(fills, fidx, strict=True):
                        if i in ended or id(a[0]) in bad:
                            # its request finishes (the sample is discarded) or fails (check): any mask, so
                            # that every row is final once the fill returns (the worker signals then)
                            rows_np[a[1]] = -1
                        else:
                            keep.append(a)
                    fills = keep
                if fills:
                    ex.unsafe_compute_mask_ptr(fills, ptr, row_bytes, n)
            return rejected

        def check(bitmask: torch.Tensor, rejected: set[int]) -> dict[int, str]:
            why: dict[int, str] = {}
            for k, c in rows:
                if c.matcher.is_error():
                    why[k] = (
                        "its token constraint rejected the sampled token"
                        if id(c) in rejected
                        else f"llguidance: {c.matcher.get_error()}"
                    )
            for k, c in stop_rows:
                if k not in why:
                    c._add_stops(bitmask, k)
            return why

        return work, check

    def accept_token(self, token_id: int) -> bool:
        token_id = int(token_id)
        if token_id in self.extra_stops and token_id != self.eos_token_id:
            ok = bool(self.matcher.is_accepting())  # the document is complete: a stop token ends it
            self._terminated = ok
            self.num_accepted += ok
            return ok
        ok = bool(self.matcher.consume_token(token_id))
        self.num_accepted += ok
        self._terminated = ok and token_id == self.eos_token_id
        return ok

    def is_terminated(self) -> bool:
        return self._terminated


def _bit(t: int) -> int:
    """Bit ``t % 32`` of an int32 word, as a Python int in int32 range (bit 31 is negative)."""
    b = 1 << (t % 32)
    return b - (1 << 32) if b >= 1 << 31 else b


class LLGuidanceBackend:
    """llguidance over one vocabulary (token bytes indexed by id, padded to the model's ``vocab_size``)."""

    name = "llguidance"

    def __init__(
        self,
        tokenizer: Any,
        tokens: list[bytes],
        special_ids: list[int],
        vocab_size: int,
        eos_token_id: int | None,
        max_whitespace: int,
        threads: int | None = None,
    ) -> None:
        import llguidance as llg

        if eos_token_id is None:
            raise ValueError(
                "the llguidance grammar backend needs the model's end-of-sequence token and this model has none; "
                'ask for structured_output.backend "xgrammar"'
            )
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        wrapper = llg.TokenizerWrapper(_Wrapper(tokenizer, tokens, eos_token_id, special_ids))
        self.tokenizer = llg.LLTokenizer(wrapper, n_vocab=vocab_size)
        self.whitespace = f"[\\x20\\x0A\\x0D\\x09]{{0,{max_whitespace}}}"
        self.json_defaults: Any = {"whitespace_pattern": self.whitespace}  # llguidance's JSON options
        self.executor = llg.LLExecutor(threads or fill_threads())

    def grammar(self, spec: StructuredOutput, schema: Any) -> str:
        """The llguidance grammar (JSON text) of a spec; ``schema`` is its parsed JSON schema for json kinds.
        Raises ValueError / TypeError / Exception from the library; the caller names the spec field."""
        import llguidance as llg

        kind, text = spec.kind, spec.key[1]
        if kind in ("json", "json_object"):
            g = llg.LLMatcher.grammar_from_json_schema(closed_objects(schema), defaults=self.json_defaults)
        elif kind == "regex":
            g = llg.LLMatcher.grammar_from_regex(ascii_classes(text))
        elif kind == "choice":
            alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice or ())
            g = llg.LLMatcher.grammar_from_lark(f"start: {alts}")
        else:  # Lark, or GBNF converted to Lark (llguidance's dialect, asked for explicitly)
            g = llg.grammar_from("grammar", text)
        if not (spec.prefix or spec.suffix):
            return g
        inner = json.loads(g)["grammars"]
        if len(inner) != 1:
            raise ValueError("a grammar of several parts cannot take a prefix or suffix")
        inner = {**inner[0], "name": "inner"}
        wrap = " ".join(
            [json.dumps(spec.prefix, ensure_ascii=False)] * bool(spec.prefix)
            + ["@inner"]
            + [json.dumps(spec.suffix, ensure_ascii=False)] * bool(spec.suffix)
        )
        return json.dumps({"grammars": [{"name": "wrap", "lark_grammar": f"start: {wrap}"}, inner]})

    def compile(self, grammar: str) -> Any:
        """A pristine matcher (runs on the compiler's worker thread: llguidance releases the GIL while it
        builds it). ValueError with llguidance's message when the grammar is invalid."""
        import llguidance as llg

        matcher = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def constraint(self, compiled: Any, stop_token_ids: list[int]) -> LLGuidanceConstraint:
        extra = [t for t in stop_token_ids if t != self.eos_token_id and 0 <= t < self.vocab_size]
        return LLGuidanceConstraint(compiled.deep_copy(), self.executor, self.eos_token_id, extra)

    def close(self) -> None:
        pass
