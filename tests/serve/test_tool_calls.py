"""Qwen3 tool calls: parsing into OpenAI tool_calls, streamed deltas that add up to the same calls, and the
prompt side (tools for plain templates, forced calls)."""

from __future__ import annotations

import json
import random

import pytest

from llmray.model.tokenizer import CHATML_TEMPLATE, QWEN3_STYLE_TEMPLATE
from llmray.serve.tool_calls import (
    ToolCallParser,
    forced_call,
    messages_for_plain_template,
    parse_tool_calls,
    template_takes_tools,
)

TWO_CALLS = (
    "I will look both up.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, {"x": "}]"}]}}\n</tool_call>\n'
    '<tool_call>\n{"arguments": {"q": "a \\"quoted\\" word"}, "name": "search"}\n</tool_call>\n'
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    },
]


def stream(text: str, prefix: str = "", seed: int = 0) -> tuple[str, dict[int, dict]]:
    """Feed ``text`` in random chunks; rebuild content and calls from the deltas as an OpenAI client does."""
    rng = random.Random(seed)
    p = ToolCallParser()
    deltas = p.feed(prefix)
    i = 0
    while i < len(text):
        n = rng.randint(1, 6)
        deltas += p.feed(text[i : i + n])
        i += n
    deltas += p.finish()
    content, calls = "", {}
    for d in deltas:
        if "content" in d:
            content += d["content"]
            continue
        tc = d["tool_call"]
        call = calls.setdefault(tc["index"], {"name": None, "arguments": "", "id": None})
        if "name" in tc:
            assert call["name"] is None, "the name is sent once, in the first delta of a call"
            call.update(name=tc["name"], id=tc["id"])
        call["arguments"] += tc.get("arguments", "")
    return content, calls


def test_parse_two_calls():
    content, calls = parse_tool_calls(TWO_CALLS)
    assert content == "I will look both up.\n"
    assert [c.name for c in calls] == ["get_weather", "search"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "days": [1, {"x": "}]"}]}
    assert json.loads(calls[1].arguments) == {"q": 'a "quoted" word'}
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


@pytest.mark.parametrize("seed", range(10))
def test_stream_adds_up_to_the_parse(seed):
    content, calls = stream(TWO_CALLS, seed=seed)
    _, parsed = parse_tool_calls(TWO_CALLS)
    assert content == "I will look both up.\n"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.name, json.loads(c.arguments)) for c in parsed
    ]


def test_no_calls_and_broken_blocks_stay_content():
    assert parse_tool_calls("plain answer <tool")[0] == "plain answer <tool"
    assert parse_tool_calls("x <tool_call>\nnot json\n</tool_call> y") == (
        "x <tool_call>\nnot json\n</tool_call> y",
        [],
    )
    content, calls = parse_tool_calls(
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}}'
    )  # cut before the tag
    assert content is None and calls[0].name == "f" and json.loads(calls[0].arguments) == {"a": 1}


def test_forced_calls():
    prefix, schema = forced_call(TOOLS, "search")
    assert prefix == '<tool_call>\n{"name": "search", "arguments": '
    assert schema == TOOLS[1]["function"]["parameters"]
    content, calls = parse_tool_calls('{"q": "x"}', prefix=prefix)
    assert content is None and calls[0].name == "search" and calls[0].arguments == '{"q": "x"}'
    prefix, schema = forced_call(TOOLS, None)  # required, several tools: the grammar picks the name
    assert prefix == "<tool_call>\n" and len(schema["anyOf"]) == 2
    _, calls = stream('{"name": "get_weather", "arguments": {"city": "Oslo"}}', prefix=prefix)
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Oslo"}


def test_plain_template_gets_tools_in_the_system_message():
    assert template_takes_tools(QWEN3_STYLE_TEMPLATE) and not template_takes_tools(CHATML_TEMPLATE)
    msgs = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ]
    out = messages_for_plain_template(msgs, TOOLS)
    assert out[0]["role"] == "system" and '"name": "search"' in out[0]["content"]
    assert out[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
    }
    assert out[3] == {
        "role": "user",
        "content": "<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response>",
    }
