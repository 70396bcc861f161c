"""Incremental detokenization with stop strings, never emitting half of a multi-byte character.

Each step decodes a short window of tokens (a few of context + the new ones) rather than the whole output,
and holds text back while the window ends in an incomplete UTF-8 sequence (the decoder yields U+FFFD) or
while it could still be the start of a stop string. Cf. vLLM's ``detokenize_incrementally``.

``lazy=True`` (a request without stop strings whose text nobody reads before it finishes: ``LLM.generate``)
only collects the ids in ``update`` and catches up in one batched update whenever the text is read (``text``,
``delta``): the same text (``update`` gives the same text however the tokens are batched), without two
``decode`` calls per token on the engine's read-back.
"""

from __future__ import annotations

from typing import Any

_CONTEXT = 5  # prompt tokens decoded before the output so leading spaces come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str], lazy: bool = False) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._text = ""  # the output text so far (stop string excluded once found)
        self.emitted = 0  # characters of ``text`` handed out as deltas
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.lazy = lazy and not stop  # (stop strings need the text at every token)
        self._pending: list[int] = []  # lazy: ids not decoded yet

    @property
    def text(self) -> str:
        """The output text so far (stop string excluded once found)."""
        if self._pending:
            self._catch_up()
        return self._text

    def _catch_up(self) -> None:
        pending, self._pending = self._pending, []
        self._update(pending)

    def update(self, new_ids: list[int]) -> str | None:
        """Add tokens; returns the stop string if one now appears in the text (the text is cut before it).

        Several tokens at once (a stream reader that fell behind) that end inside a character advance token
        by token, so the complete text before that character is not held back with it (nor lost, if the
        request ends there): the text is the same however the tokens are batched. Lazy: the ids are kept
        for the next read of the text (None)."""
        if self.lazy:
            self._pending.extend(new_ids)
            return None
        if self._pending:
            self._catch_up()
        return self._update(new_ids)

    def _update(self, new_ids: list[int]) -> str | None:
        start = len(self.ids)
        self.ids.extend(new_ids)
        if self.tokenizer is None:
            return None
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(new_ids) == 1 or not full.endswith("\ufffd"):
            return self._advance(len(self.ids), full)
        for end in range(start + 1, len(self.ids) + 1):
            hit = self._advance(end, None)
            if hit is not None:
                return hit
        return None

    def _advance(self, end: int, full: str | None) -> str | None:
        """Take the text of ``ids[:end]`` (``full``: the decoded window, if known) if it ends on a complete
        character; returns the stop string found, if any."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        if full is None:
            full = self.tokenizer.decode(self.ids[self.prefix_offset : end])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return None  # an incomplete character (or nothing new yet): wait for more tokens
        search_from = max(0, len(self._text) - self.hold)
        self._text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, end
        for s in self.stop:
            idx = self._text.find(s, search_from)
            if idx >= 0:
                self._text = self._text[:idx]
                return s
        return None

    def delta(self, finished: bool) -> str:
        """Text not handed out yet; while running, keep back what could begin a stop string."""
        text = self.text
        end = len(text) if finished else max(self.emitted, len(text) - self.hold)
        out = text[self.emitted : end]
        self.emitted = end
        return out
