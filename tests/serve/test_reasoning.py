"""<think>...</think> split into reasoning_content: streamed deltas agree with the whole-text split."""

from __future__ import annotations

import random

import pytest

from llmray.model.tokenizer import CHATML_TEMPLATE, QWEN3_STYLE_TEMPLATE
from llmray.serve.reasoning import (
    ReasoningParser,
    prompt_opens_thinking,
    split_reasoning,
    template_has_thinking,
)

CASES = [
    (
        "<think>\nLet me think.\nOK.\n</think>\n\nThe answer is 4.",
        False,
        "Let me think.\nOK.",
        "The answer is 4.",
    ),
    ("The answer is 4.", False, None, "The answer is 4."),
    ("<think>\ncut off by max_tok", False, "cut off by max_tok", None),
    ("<think>\n\n</think>\n\nHi", False, "", "Hi"),
    ("  <think>a < b</think>b", False, "a < b", "b"),
    (
        "reasoning started in the prompt\n</think>\n\nanswer",
        True,
        "reasoning started in the prompt",
        "answer",
    ),
    ("no think tags <thin", False, None, "no think tags <thin"),
]


@pytest.mark.parametrize(("text", "opened", "reasoning", "content"), CASES)
def test_split(text, opened, reasoning, content):
    assert split_reasoning(text, opened) == (reasoning, content)


@pytest.mark.parametrize(("text", "opened", "reasoning", "content"), CASES)
def test_stream_matches_split(text, opened, reasoning, content):
    rng = random.Random(0)
    for _ in range(20):  # random chunkings, tags split anywhere
        p = ReasoningParser(opened)
        rs, cs, i = "", "", 0
        while i < len(text):
            n = rng.randint(1, 5)
            r, c = p.feed(text[i : i + n])
            rs, cs, i = rs + r, cs + c, i + n
        r, c = p.finish()
        assert (rs + r, cs + c) == (reasoning or "", content or "")


def test_template_and_prompt_detection():
    assert template_has_thinking(QWEN3_STYLE_TEMPLATE) and not template_has_thinking(CHATML_TEMPLATE)
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")
