"""Tool calls and thinking through the official ``openai`` client over the in-process app (no Ray), on
scripted model outputs: "auto" parses the model's ``<tool_call>`` blocks into ``tool_calls``, ``<think>``
becomes ``reasoning_content``, streamed and not; fields we do not implement are a 400 naming the field."""

from __future__ import annotations

import json

import openai
import pytest
from _support.local_backend import LocalBackend
from fastapi.testclient import TestClient

from llmray.serve.ingress import IngressConfig, build_openai_app
from llmray.serve.server import LLMServer

MODEL = "scripted"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]


@pytest.fixture(scope="module")
def client() -> openai.OpenAI:
    server = LLMServer(
        "unused",
        MODEL,
        engine_factory="_support.scripted_engine:ScriptedAsyncLLM",
        engine_kwargs={"max_model_len": 4096},
        enable_metrics=False,
    )
    app = build_openai_app(LocalBackend(server), IngressConfig(MODEL))
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="x", http_client=TestClient(app), max_retries=0
    )


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def collect(stream) -> dict:
    out = {"content": "", "reasoning": "", "calls": {}, "finish": None}
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        d = ch.delta
        out["content"] += d.content or ""
        out["reasoning"] += getattr(d, "reasoning_content", None) or ""
        for tc in d.tool_calls or []:
            call = out["calls"].setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                call["id"], call["name"] = tc.id, tc.function.name
            call["arguments"] += tc.function.arguments or ""
        out["finish"] = ch.finish_reason or out["finish"]
    return out


def test_auto_tool_calls_parse(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("[tool] weather?"), tools=TOOLS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Let me check.\n"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"tz": "Europe/Paris"}),
    ]
    s = collect(
        client.chat.completions.create(model=MODEL, messages=ask("[tool] weather?"), tools=TOOLS, stream=True)
    )
    assert s["finish"] == "tool_calls" and s["content"] == "Let me check.\n"
    assert [(c["name"], json.loads(c["arguments"])) for c in s["calls"].values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls
    ]
    # without tools the same output is plain content
    plain = client.chat.completions.create(model=MODEL, messages=ask("[tool] weather?"))
    assert "<tool_call>" in plain.choices[0].message.content and not plain.choices[0].message.tool_calls


def test_tool_results_go_back_into_the_conversation(client):
    history = ask("[think] weather?") + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
    assert r.choices[0].message.content == "The answer is 4." and r.choices[0].finish_reason == "stop"


def test_reasoning_split(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("[think] 2+2?"))
    msg = r.choices[0].message
    assert msg.reasoning_content == "Two and two make four." and msg.content == "The answer is 4."
    s = collect(client.chat.completions.create(model=MODEL, messages=ask("[think] 2+2?"), stream=True))
    assert (s["reasoning"], s["content"]) == ("Two and two make four.", "The answer is 4.")
    both = client.chat.completions.create(model=MODEL, messages=ask("[think+tool] weather?"), tools=TOOLS)
    m = both.choices[0].message
    assert m.reasoning_content == "I need the weather." and m.tool_calls[0].function.name == "get_weather"
    off = client.chat.completions.create(
        model=MODEL, messages=ask("plain"), extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert off.choices[0].message.content == "ok" and off.choices[0].message.reasoning_content is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {"5": 3}}, "logit_bias"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
    ],
)
def test_unsupported_or_inconsistent_fields_are_400_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ask("hi"), extra_body=extra)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    ok = client.chat.completions.create(
        model=MODEL, messages=ask("hi"), user="u", metadata={"k": "v"}, store=False
    )
    assert ok.choices[0].message.content == "ok"
