"""The Qwen3-style chat template our tokenizers carry: tools, tool calls and results, thinking; rendered the
same by transformers; unchanged from plain ChatML for plain conversations."""

from __future__ import annotations

import json

import pytest

from llmray.model.tokenizer import CHATML_TEMPLATE, Tokenizer, char_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    {"role": "assistant", "content": "18C and sunny."},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return char_tokenizer("héllo wörld")


def test_plain_conversation_renders_as_chatml(tok):
    plain = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    chatml = Tokenizer(tok.backend, {**tok.config, "chat_template": CHATML_TEMPLATE})
    for gen in (True, False):
        assert tok.apply_chat_template(plain, add_generation_prompt=gen) == chatml.apply_chat_template(
            plain, add_generation_prompt=gen
        )


def test_tools_calls_results_and_thinking(tok):
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(TOOLS[0], ensure_ascii=False) in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        in text
    )
    assert "<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    off = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    args_as_dict = [{**CONVERSATION[2], "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}]
    assert '{"name": "f", "arguments": {"a": 1}}' in tok.apply_chat_template(
        args_as_dict, add_generation_prompt=False
    )


def test_transformers_renders_the_same(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = tok.apply_chat_template(
        CONVERSATION, tools=TOOLS, add_generation_prompt=True, enable_thinking=False
    )
    theirs = auto.apply_chat_template(
        CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert ours == theirs
