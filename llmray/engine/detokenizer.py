"""Incremental detokenization with stop strings, never emitting half of a multi-byte character.

Each step decodes a short window of tokens (a few of context + the new ones) rather than the whole output,
and holds text back while the window ends in an incomplete UTF-8 sequence (the decoder yields U+FFFD) or
while it could still be the start of a stop string. Cf. vLLM's ``detokenize_incrementally``.
"""

from __future__ import annotations

from typing import Any

_CONTEXT = 5  # prompt tokens decoded before the output so leading spaces come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # the output text so far (stop string excluded once found)
        self.emitted = 0  # characters of ``text`` handed out as deltas
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1

    def update(self, new_ids: list[int]) -> str | None:
        """Add tokens; returns the stop string if one now appears in the text (the text is cut before it).

        Several tokens at once (a stream reader that fell behind) that end inside a character advance token
        by token, so the complete text before that character is not held back with it (nor lost, if the
        request ends there): the text is the same however the tokens are batched."""
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
        search_from = max(0, len(self.text) - self.hold)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, end
        for s in self.stop:
            idx = self.text.find(s, search_from)
            if idx >= 0:
                self.text = self.text[:idx]
                return s
        return None

    def delta(self, finished: bool) -> str:
        """Text not handed out yet; while running, keep back what could begin a stop string."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
