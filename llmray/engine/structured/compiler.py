"""Grammar compilation per tokenizer (xgrammar), cached by spec, with a time limit; the per-request constraint.

``GrammarCompiler(tokenizer, vocab_size, eos_token_id)`` is built once per engine, at the first constrained
request (xgrammar is imported then, not at engine start). ``constraint(spec)`` returns a fresh
``GrammarConstraint`` (the engine's ``TokenConstraint``: ``fill_bitmask`` / ``accept_token`` /
``is_terminated``) over a compiled grammar taken from an LRU cache keyed by the spec. A spec that does not
compile, or whose compilation runs past ``compile_timeout_s``, is a ``ValueError`` naming the problem (the API
turns it into a 400); such failures are cached too, so a client retrying a bad schema costs nothing.

JSON whitespace between elements is bounded (``MAX_JSON_WHITESPACE`` characters per gap): a model cannot
loop on whitespace until ``max_tokens``. Compilation runs on a worker thread (xgrammar releases the GIL), so
the time limit holds; a compile that overruns finishes in the background and is dropped.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from llmray.engine.structured.spec import StructuredOutput
from llmray.engine.structured.vocab import Vocab, build_vocab

MAX_JSON_WHITESPACE = 2  # whitespace characters allowed in one gap of a JSON document
DEFAULT_COMPILE_TIMEOUT_S = 10.0
DEFAULT_CACHE_ENTRIES = 256
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"  # as xgrammar prints it
_STRICT_STRING_CHAR = r"[^\0-\x1f\"\\\r\n]"
_CPP_PREFIX = re.compile(r"\[[\d:]+\] \S+:\d+: ")


# keywords xgrammar would silently ignore: refused, so that every document we return validates
UNSUPPORTED_KEYWORDS = (
    "multipleOf",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "if",
    "then",
    "else",
    "not",
)
_SCHEMA_MAPS = ("properties", "$defs", "definitions")


def unsupported_keyword(node: Any, path: str = "$") -> str | None:
    """The first keyword of ``UNSUPPORTED_KEYWORDS`` used anywhere in a schema, with where (or None)."""
    if isinstance(node, list):
        for i, v in enumerate(node):
            found = unsupported_keyword(v, f"{path}[{i}]")
            if found:
                return found
        return None
    if not isinstance(node, dict):
        return None
    for k, v in node.items():
        if k in UNSUPPORTED_KEYWORDS:
            return f"'{k}' (at {path})"
        if k in ("enum", "const", "default", "examples", "description", "title"):
            continue  # values, not subschemas
        if k in _SCHEMA_MAPS and isinstance(v, dict):
            for name, sub in v.items():
                found = unsupported_keyword(sub, f"{path}.{k}.{name}")
                if found:
                    return found
        elif isinstance(v, dict | list):
            found = unsupported_keyword(v, f"{path}.{k}")
            if found:
                return found
    return None


def _json_object_schema() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": True}


class GrammarConstraint:
    """One request's grammar state over the engine's vocabulary (the ``TokenConstraint`` protocol).

    With a ``pool``, accepting a token starts computing the next mask on a worker thread (xgrammar releases
    the GIL), so the masks of a step's constrained rows are computed in parallel, overlapping the engine's
    other host work; ``fill_bitmask`` then copies the finished row. Without one, ``fill_bitmask`` computes.
    """

    def __init__(
        self,
        compiled: Any,
        stop_token_ids: list[int],
        vocab_size: int,
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None)
        self.num_accepted = 0
        self._terminated = False
        self._pool = pool
        self._next: Future | None = None
        self._row = torch.empty((1, (vocab_size + 31) // 32), dtype=torch.int32) if pool is not None else None

    def _compute(self) -> None:
        assert self._row is not None, "scheduled on the pool only when a pool (and its row) exists"
        self.matcher.fill_next_token_bitmask(self._row, 0)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens of this request into ``bitmask[row]`` (int32, 1 bit per token)."""
        if self._next is not None:
            future, self._next = self._next, None
            future.result()
            assert self._row is not None, "a mask computed ahead lands in the pool's row"
            bitmask[row].copy_(self._row[0])
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        if self._next is not None:  # a mask computed but never used (the step was dropped): wait for it
            self._next.result()
            self._next = None
        ok = bool(self.matcher.accept_token(int(token_id)))
        self.num_accepted += ok
        self._terminated = bool(self.matcher.is_terminated())
        if ok and not self._terminated and self._pool is not None:
            self._next = self._pool.submit(self._compute)
        return ok

    def is_terminated(self) -> bool:
        return self._terminated


class GrammarCompiler:
    """Compiles ``StructuredOutput`` specs for one tokenizer and one model vocabulary size."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_id: int | None,
        compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
        max_entries: int = DEFAULT_CACHE_ENTRIES,
        max_threads: int | None = None,
        fill_threads: int | None = None,
    ) -> None:
        import xgrammar as xgr

        if tokenizer is None:
            raise ValueError("structured output needs a tokenizer; this engine has none")
        self.vocab: Vocab = build_vocab(tokenizer)
        tokens = self.vocab.tokens[:vocab_size]
        self.vocab_size = vocab_size
        self.stop_token_ids = [eos_token_id] if eos_token_id is not None else []
        self.info = xgr.TokenizerInfo(
            tokens, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids or None
        )
        threads = max_threads or max(1, min(8, os.cpu_count() or 1))
        self._xgr = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self.compile_timeout_s = compile_timeout_s
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple, Any] = OrderedDict()  # key -> CompiledGrammar | ValueError
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmray-grammar")
        # next-token masks computed in parallel as tokens are accepted (GrammarConstraint); 0 = in fill_bitmask
        self.fill_threads = threads if fill_threads is None else fill_threads
        self._fill_pool = (
            ThreadPoolExecutor(self.fill_threads, thread_name_prefix="llmray-mask")
            if self.fill_threads
            else None
        )
        self.num_compiles = 0
        # tokens that are more than whitespace: a grammar whose first step allows none of them can only
        # emit a little leading whitespace and then get stuck
        content = [bool(t.strip()) for t in tokens] + [False] * (vocab_size - len(tokens))
        self._content = torch.tensor(content, dtype=torch.bool)

    # --- grammar text -------------------------------------------------------------------------------
    def _grammar(self, spec: StructuredOutput) -> Any:
        """The xgrammar ``Grammar`` of a spec (no tokenizer work yet); errors name the spec field."""
        import xgrammar as xgr

        kind, text = spec.kind, spec.key[1]
        try:
            if kind in ("json", "json_object"):
                schema = _json_object_schema() if kind == "json_object" else json.loads(text)
                bad = unsupported_keyword(schema)
                if bad:
                    raise ValueError(f"the schema keyword {bad} is not supported; remove it")
                g = xgr.Grammar.from_json_schema(
                    json.dumps(schema), any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE
                )
                # xgrammar 0.2.9 lets length-bounded strings hold raw control characters (invalid JSON):
                # exclude them as its unbounded strings do
                text_g = str(g)
                if _LOOSE_STRING_CHAR in text_g:
                    g = xgr.Grammar.from_ebnf(text_g.replace(_LOOSE_STRING_CHAR, _STRICT_STRING_CHAR))
            elif kind == "regex":
                g = xgr.Grammar.from_regex(text)
            elif kind == "choice":
                alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice or ())
                g = xgr.Grammar.from_ebnf(f"root ::= {alts}")
            else:
                g = xgr.Grammar.from_ebnf(text)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's errors are RuntimeError subclasses
            what = {"json": "JSON schema", "json_object": "JSON object grammar"}.get(kind, kind)
            raise ValueError(f"structured_output.{kind}: the {what} cannot be used: {_short(e)}") from None
        parts = []
        if spec.prefix:
            parts.append(xgr.Grammar.from_ebnf(f"root ::= {json.dumps(spec.prefix, ensure_ascii=False)}"))
        parts.append(g)
        if spec.suffix:
            parts.append(xgr.Grammar.from_ebnf(f"root ::= {json.dumps(spec.suffix, ensure_ascii=False)}"))
        return xgr.Grammar.concat(*parts) if len(parts) > 1 else g

    def _compile(self, spec: StructuredOutput) -> Any:
        grammar = self._grammar(spec)
        future = self._pool.submit(self._xgr.compile_grammar, grammar)
        try:
            return future.result(timeout=self.compile_timeout_s)
        except FutureTimeout:
            raise ValueError(
                f"structured_output.{spec.kind}: the grammar did not compile within {self.compile_timeout_s:g} s; "
                "simplify it (fewer alternatives, smaller repetition counts, shallower nesting)"
            ) from None
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"structured_output.{spec.kind}: the grammar cannot be compiled: {_short(e)}"
            ) from None

    def compiled(self, spec: StructuredOutput) -> Any:
        """The compiled grammar of ``spec`` (cached; a cached failure is raised again)."""
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
        if hit is None:
            try:
                hit = self._compile(spec)
                self.num_compiles += 1
            except ValueError as e:
                hit = e
            with self._lock:
                self._cache[spec.key] = hit
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        if isinstance(hit, ValueError):
            raise ValueError(str(hit))
        return hit

    def constraint(
        self, spec: StructuredOutput, extra_stop_token_ids: list[int] | None = None
    ) -> GrammarConstraint:
        """A fresh per-request constraint. ValueError when the spec cannot be compiled or when this
        vocabulary cannot write even the first character of any matching document."""
        compiled = self.compiled(spec)
        stops = list(dict.fromkeys([*self.stop_token_ids, *(extra_stop_token_ids or [])]))
        c = GrammarConstraint(compiled, stops, self.vocab_size, self._fill_pool)
        probe = torch.zeros((1, (self.vocab_size + 31) // 32), dtype=torch.int32)
        c.fill_bitmask(probe, 0)
        if not bool((unpack_bitmask(probe[0], self.vocab_size) & self._content).any()):
            raise ValueError(
                f"structured_output.{spec.kind}: this model's vocabulary has no token that can start a matching "
                "document (a char-level tokenizer lacks the characters it needs)"
            )
        return c

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._fill_pool is not None:
            self._fill_pool.shutdown(wait=False)


def unpack_bitmask(row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(ceil(V/32),) int32 bitmask -> (V,) bool of allowed tokens."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (row[:, None] >> shifts) & 1
    return bits.flatten()[:vocab_size].bool()


def _short(e: BaseException, limit: int = 400) -> str:
    """The library's message without its ``[time] file.cc:line:`` prefix, on one line, clipped."""
    text = _CPP_PREFIX.sub("", " ".join(str(e).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."
