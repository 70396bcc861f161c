"""Grammar compilation per tokenizer, cached by spec, with a time limit; the per-request constraint.

``GrammarCompiler(tokenizer, vocab_size, eos_token_id)`` is built once per engine, at the first constrained
request. Each spec names its grammar library (``StructuredOutput.library``: llguidance for JSON / regex / choice
under ``backend="auto"``, xgrammar for EBNF grammars; ``llguidance_backend.py`` / ``xgrammar_backend.py``); a
library is imported and set up over the vocabulary the first time a spec asks for it. ``constraint(spec)``
returns a fresh ``TokenConstraint`` (``fill_bitmask`` / ``accept_token`` / ``is_terminated``) over a compiled
grammar taken from an LRU cache keyed by the spec (library included). A spec that does not compile, or whose
compilation runs past ``compile_timeout_s``, is a ``ValueError`` naming the problem (the API turns it into a
400); such failures are cached too, so a client retrying a bad schema costs nothing. Schema keywords neither
library enforces are refused by name before either sees the schema.

JSON whitespace between elements is bounded (``MAX_JSON_WHITESPACE`` characters per gap): a model cannot
loop on whitespace until ``max_tokens``. Compilation runs on a worker thread (both libraries release the
GIL), so the time limit holds; a compile that overruns finishes in the background and is dropped.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
import torch

from llmray.engine.sequence import TokenConstraint
from llmray.engine.structured.batch import usable_cpus
from llmray.engine.structured.spec import StructuredOutput
from llmray.engine.structured.vocab import Vocab, build_vocab

MAX_JSON_WHITESPACE = 2  # whitespace characters allowed in one gap of a JSON document
DEFAULT_COMPILE_TIMEOUT_S = 10.0
DEFAULT_CACHE_ENTRIES = 256
_CPP_PREFIX = re.compile(r"\[[\d:]+\] \S+:\d+: ")


# keywords a grammar library would ignore or refuse: refused by name, so that every document we return validates
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
        if tokenizer is None:
            raise ValueError("structured output needs a tokenizer; this engine has none")
        self.tokenizer = tokenizer
        self.vocab: Vocab = build_vocab(tokenizer)
        tokens = self.vocab.tokens[:vocab_size]
        self.tokens = tokens + [b""] * (vocab_size - len(tokens))  # the model's vocabulary may be padded
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.stop_token_ids = [eos_token_id] if eos_token_id is not None else []
        self.threads = max_threads or min(8, usable_cpus())
        # xgrammar: next-token masks computed ahead on threads as tokens are accepted; 0 = in fill_bitmask
        self.fill_threads = self.threads if fill_threads is None else fill_threads
        self.compile_timeout_s = compile_timeout_s
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple, Any] = OrderedDict()  # key -> compiled grammar | ValueError
        self._lock = threading.Lock()
        self._backends: dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmray-grammar")
        self.num_compiles = 0
        # tokens that are more than whitespace: a grammar whose first step allows none of them can only
        # emit a little leading whitespace and then get stuck
        # (as int32 bitmask words, so that a mask is checked with one numpy AND, no torch op: a torch CPU op
        # per request ran on every OpenMP thread and crawled when the host's cores were busy)
        content = np.zeros(-(-vocab_size // 32) * 32, dtype=np.uint64)
        content[:vocab_size] = [bool(t.strip()) for t in self.tokens]
        shifts = np.arange(32, dtype=np.uint64)
        self._content = (content.reshape(-1, 32) << shifts).sum(1).astype(np.uint32).view(np.int32)
        self._startable: dict[tuple, bool] = {}  # spec key -> its first mask allows a content token

    def backend(self, name: str) -> Any:
        """The grammar library ``name`` ("llguidance" | "xgrammar") set up over this vocabulary (once)."""
        with self._lock:
            hit = self._backends.get(name)
        if hit is not None:
            return hit
        if name == "llguidance":
            from llmray.engine.structured.llguidance_backend import LLGuidanceBackend

            special = sorted(i for i in self.vocab.special_ids if i < self.vocab_size)
            hit = LLGuidanceBackend(
                self.tokenizer, self.tokens, special, self.vocab_size, self.eos_token_id, MAX_JSON_WHITESPACE
            )
        else:
            from llmray.engine.structured.xgrammar_backend import XGrammarBackend

            hit = XGrammarBackend(
                self.tokens,
                self.vocab_size,
                self.stop_token_ids,
                self.threads,
                self.fill_threads,
                MAX_JSON_WHITESPACE,
            )
        with self._lock:
            return self._backends.setdefault(name, hit)

    # --- grammar text -------------------------------------------------------------------------------
    def _grammar(self, spec: StructuredOutput, backend: Any) -> Any:
        """The backend's grammar of a spec (no tokenizer work yet); errors name the spec field."""
        kind = spec.kind
        schema = None
        if kind in ("json", "json_object"):
            schema = _json_object_schema() if kind == "json_object" else json.loads(spec.key[1])
            bad = unsupported_keyword(schema)
            if bad:
                raise ValueError(
                    f"structured_output.json: the schema keyword {bad} is not supported; remove it"
                )
        try:
            return backend.grammar(spec, schema)
        except Exception as e:  # the libraries raise RuntimeError, ValueError, TypeError or bare Exception
            what = {"json": "JSON schema", "json_object": "JSON object grammar"}.get(kind, kind)
            raise ValueError(f"structured_output.{kind}: the {what} cannot be used: {_short(e)}") from None

    def _compile(self, spec: StructuredOutput) -> Any:
        backend = self.backend(spec.library)
        grammar = self._grammar(spec, backend)
        future = self._pool.submit(backend.compile, grammar)
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
    ) -> TokenConstraint:
        """A fresh per-request constraint. ValueError when the spec cannot be compiled or when this
        vocabulary cannot write even the first character of any matching document."""
        compiled = self.compiled(spec)
        stops = list(dict.fromkeys([*self.stop_token_ids, *(extra_stop_token_ids or [])]))
        c = self.backend(spec.library).constraint(compiled, stops)
        ok = self._startable.get(spec.key)
        if ok is None:  # (once per spec: the first mask of a fresh matcher is the same for every request)
            probe = torch.zeros((1, self._content.shape[0]), dtype=torch.int32)
            c.fill_bitmask(probe, 0)
            ok = bool((probe.numpy()[0] & self._content).any())
            if len(self._startable) >= 4 * self.max_entries:
                self._startable.clear()
            self._startable[spec.key] = ok
        if not ok:
            raise ValueError(
                f"structured_output.{spec.kind}: this model's vocabulary has no token that can start a matching "
                "document (a char-level tokenizer lacks the characters it needs)"
            )
        return c

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for b in self._backends.values():
            b.close()


def unpack_bitmask(row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(ceil(V/32),) int32 bitmask -> (V,) bool of allowed tokens."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (row[:, None] >> shifts) & 1
    return bits.flatten()[:vocab_size].bool()


def _short(e: BaseException, limit: int = 400) -> str:
    """The library's message without its ``[time] file.cc:line:`` prefix, on one line, clipped."""
    text = _CPP_PREFIX.sub("", " ".join(str(e).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."
