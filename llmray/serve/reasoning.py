"""Qwen3 thinking: split ``<think>...</think>`` from the answer into ``reasoning_content``, streaming-aware.

As vLLM's qwen3 reasoning parser: text inside the think block is reasoning, the rest is content. The parser
holds back only what could be the start of a tag (``<thi``) or whitespace at a boundary, so streamed deltas
concatenate to exactly what the non-streamed response holds. A prompt that already opened the block (some
templates end the generation prompt with ``<think>\\n``) starts the parser inside it. Off (everything is
content) when the chat template has no thinking.
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"


def template_has_thinking(template: str | None) -> bool:
    return template is not None and THINK_END in template


def prompt_opens_thinking(prompt: str) -> bool:
    """The rendered prompt ends inside an open think block (the model continues the reasoning)."""
    start = prompt.rfind(THINK_START)
    return start >= 0 and prompt.find(THINK_END, start) < 0


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """Feed output text deltas; get ``(reasoning_delta, content_delta)`` back."""

    def __init__(self, in_reasoning: bool = False) -> None:
        self.state = "reasoning" if in_reasoning else "start"
        self.buf = ""
        self.strip_lead = True  # leading newlines of the reasoning and of the answer after it are dropped

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning, content = [], []
        while True:
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(THINK_START):
                    self.state, self.buf, self.strip_lead = "reasoning", s[len(THINK_START) :], True
                    continue
                if THINK_START.startswith(s):  # nothing yet, or a partial tag: wait
                    break
                self.state, self.strip_lead = "content", False
                continue
            if self.state == "reasoning":
                if self.strip_lead:
                    self.buf = self.buf.lstrip("\n")
                    self.strip_lead = not self.buf
                end = self.buf.find(THINK_END)
                if end >= 0:
                    reasoning.append(self.buf[:end].rstrip())
                    self.buf, self.state, self.strip_lead = self.buf[end + len(THINK_END) :], "content", True
                    continue
                keep = _partial_suffix(self.buf, THINK_END)
                body = self.buf[: len(self.buf) - keep]
                trail = len(body) - len(body.rstrip())  # trailing whitespace waits: it may precede </think>
                emit = body[: len(body) - trail]
                reasoning.append(emit)
                self.buf = self.buf[len(emit) :]
                break
            # content
            if self.strip_lead:
                self.buf = self.buf.lstrip("\n")
                self.strip_lead = not self.buf
            content.append(self.buf)
            self.buf = ""
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Flush what was held back at the end of the output."""
        buf, self.buf = self.buf, ""
        if self.state == "reasoning":  # the block never closed (cut by max_tokens): all reasoning
            return buf.rstrip(), ""
        if self.state == "start":
            return "", buf
        return "", buf


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str | None]:
    """Non-streamed split: ``(reasoning_content or None, content or None)``."""
    p = ReasoningParser(in_reasoning)
    r1, c1 = p.feed(text)
    r2, c2 = p.finish()
    reasoning, content = r1 + r2, c1 + c2
    saw_think = in_reasoning or THINK_START in text or THINK_END in text
    return (reasoning if saw_think else None), (content or None)
