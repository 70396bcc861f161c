"""The xgrammar backend: a spec's grammar compiled against the engine's vocabulary, and its per-request matcher.

``XGrammarBackend(vocab_tokens, vocab_size, stop_token_ids)`` is built by ``GrammarCompiler`` the first time a
spec asks for xgrammar (xgrammar is imported then). ``grammar(spec)`` builds the grammar text (errors name the
spec field), ``compile(grammar)`` is what ``GrammarCompiler`` runs on its worker thread under the time limit,
``constraint(compiled, stops)`` a fresh ``XGrammarConstraint``. The EBNF dialect of ``grammar`` specs is
xgrammar's (GBNF as llama.cpp writes it), which is why ``auto`` keeps xgrammar for them.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from llmray.engine.structured.spec import StructuredOutput

_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"  # as xgrammar prints it
_STRICT_STRING_CHAR = r"[^\0-\x1f\"\\\r\n]"


class XGrammarConstraint:
    """One request's grammar state over the engine's vocabulary (the ``TokenConstraint`` protocol).

    With a ``pool``, accepting a token starts computing the next mask on a worker thread (xgrammar releases
    the GIL), so the masks of a step's constrained rows are computed in parallel, overlapping the engine's
    other host work; ``fill_bitmask`` then copies the finished row. Without one, ``fill_bitmask`` computes.
    """

    backend = "xgrammar"
    fills_whole_row = True  # its fill writes every word of the row (structured/batch.py skips the reset)

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


class XGrammarBackend:
    """xgrammar over one vocabulary (token bytes indexed by id, padded to the model's ``vocab_size``)."""

    name = "xgrammar"

    def __init__(
        self,
        tokens: list[bytes],
        vocab_size: int,
        stop_token_ids: list[int],
        max_threads: int,
        fill_threads: int,
        max_whitespace: int,
    ) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.max_whitespace = max_whitespace
        self.info = xgr.TokenizerInfo(
            tokens, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None
        )
        self._xgr = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        # next-token masks computed in parallel as tokens are accepted; 0 threads = computed in fill_bitmask
        self.fill_threads = fill_threads
        self.fill_pool = (
            ThreadPoolExecutor(fill_threads, thread_name_prefix="llmray-mask") if fill_threads else None
        )

    def grammar(self, spec: StructuredOutput, schema: Any) -> Any:
        """The xgrammar ``Grammar`` of a spec (``schema``: its parsed JSON schema for json kinds). Raises
        the library's RuntimeError / ValueError / TypeError; the caller names the spec field."""
        import xgrammar as xgr

        kind, text = spec.kind, spec.key[1]
        if kind in ("json", "json_object"):
            g = xgr.Grammar.from_json_schema(
                json.dumps(schema), any_whitespace=True, max_whitespace_cnt=self.max_whitespace
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
        parts = []
        if spec.prefix:
            parts.append(xgr.Grammar.from_ebnf(f"root ::= {json.dumps(spec.prefix, ensure_ascii=False)}"))
        parts.append(g)
        if spec.suffix:
            parts.append(xgr.Grammar.from_ebnf(f"root ::= {json.dumps(spec.suffix, ensure_ascii=False)}"))
        return xgr.Grammar.concat(*parts) if len(parts) > 1 else g

    def compile(self, grammar: Any) -> Any:
        """Runs on the compiler's worker thread (xgrammar releases the GIL)."""
        return self._xgr.compile_grammar(grammar)

    def constraint(self, compiled: Any, stop_token_ids: list[int]) -> XGrammarConstraint:
        return XGrammarConstraint(compiled, stop_token_ids, self.vocab_size, self.fill_pool)

    def close(self) -> None:
        if self.fill_pool is not None:
            self.fill_pool.shutdown(wait=False)
