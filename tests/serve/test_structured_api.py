"""The API side of structured outputs, tools and thinking, without a server: request validation, the
rendered prompt and engine spec per tool_choice, and each choice's output split into OpenAI pieces."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ValidationError

from llmray.model.tokenizer import CHATML_TEMPLATE, Tokenizer, char_tokenizer
from llmray.serve.structured_api import ChoiceOutput, StructuredFields, ToolCallItem, ToolFields, plan_chat

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SEARCH = {
    "type": "function",
    "function": {"name": "search", "parameters": {"type": "object", "properties": {}}},
}


class Msg(BaseModel):  # a stand-in for protocol.ChatMessage
    role: str
    content: str | None = None
    tool_calls: list[ToolCallItem] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        return self.content or ""


class Req(ToolFields):
    messages: list[Msg]
    add_generation_prompt: bool = True


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return char_tokenizer("x")


def req(**kw) -> Req:
    return Req.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


def test_response_format_specs():
    assert req().response_format_spec() is None
    assert req(response_format={"type": "text"}).response_format_spec() is None
    assert req(response_format={"type": "json_object"}).response_format_spec() == {"json_object": True}
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}, "strict": True}}
    assert req(response_format=rf).response_format_spec() == {"json": {"type": "object"}}
    assert StructuredFields.model_validate(
        {"response_format": {"type": "json_schema", "json_schema": {"schema_": {"type": "integer"}}}}
    ).response_format_spec() == {"json": {"type": "integer"}}  # a model_dump() round trip keeps the schema


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"functions": []}, "functions is not supported.*use tools"),
        ({"response_format": {"type": "json_schema"}}, "needs a json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tools": [WEATHER, WEATHER]}, "distinct"),
        ({"chat_template_kwargs": {"messages": []}}, "(?s)chat_template_kwargs.*'messages' is not allowed"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "cannot be combined",
        ),
    ],
)
def test_bad_fields_name_the_problem(fields, match):
    with pytest.raises(ValidationError, match=match):
        req(**fields)
    assert req(user="u", metadata={"a": "b"}, store=False, logit_bias={}, modalities=["text"])


def test_plans(tok):
    plain = plan_chat(req(), tok)
    assert plain.prompt.endswith("<|im_start|>assistant\n") and plain.structured_output is None
    assert plain.reasoning and not plain.in_reasoning  # the Qwen3-style template has thinking
    auto = plan_chat(req(tools=[WEATHER, SEARCH]), tok)
    assert '"name": "search"' in auto.prompt and auto.tool_mode == "auto" and auto.structured_output is None
    none = plan_chat(req(tools=[WEATHER], tool_choice="none"), tok)
    assert "get_weather" not in none.prompt and none.tool_mode == "none"
    named = plan_chat(
        req(tools=[WEATHER, SEARCH], tool_choice={"type": "function", "function": {"name": "search"}}), tok
    )
    assert named.prompt.endswith('<tool_call>\n{"name": "search", "arguments": ')
    assert (
        named.structured_output == {"json": SEARCH["function"]["parameters"]}
        and named.forced_name == "search"
    )
    several = plan_chat(req(tools=[WEATHER, SEARCH], tool_choice="required"), tok)
    assert several.prompt.endswith("<tool_call>\n") and len(several.structured_output["json"]["anyOf"]) == 2
    off = plan_chat(req(chat_template_kwargs={"enable_thinking": False}), tok)
    assert off.prompt.endswith("<think>\n\n</think>\n\n")


def test_plain_template_gets_tools_and_history(tok):
    chatml = Tokenizer(tok.backend, {**tok.config, "chat_template": CHATML_TEMPLATE})
    history = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "x"}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    plan = plan_chat(Req.model_validate({"messages": history, "tools": [WEATHER]}), chatml)
    assert plan.prompt.startswith("<|im_start|>system\n# Tools") and not plan.reasoning
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "x"}}\n</tool_call>' in plan.prompt
    assert "<tool_response>\nsunny\n</tool_response>" in plan.prompt


def run(out: ChoiceOutput, text: str, step: int = 3) -> dict:
    content, reasoning, calls = "", "", {}
    for i in range(0, len(text) + 1, step):
        piece = out.feed(text[i : i + step], final=i + step > len(text))
        content += piece["content"]
        reasoning += piece["reasoning_content"]
        for d in piece["tool_calls"]:
            c = calls.setdefault(d["index"], {"name": None, "arguments": ""})
            if "id" in d:
                c["name"] = d["function"]["name"]
            c["arguments"] += d["function"]["arguments"]
    return {"content": content, "reasoning": reasoning, "calls": list(calls.values())}


def test_choice_outputs(tok):
    think = "<think>\nweigh it\n</think>\n\nLet me call.\n<tool_call>\n"
    think += '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    out = ChoiceOutput(plan_chat(req(tools=[WEATHER]), tok))
    got = run(out, think)
    assert got["reasoning"] == "weigh it" and got["content"] == "Let me call.\n"
    assert got["calls"] == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    assert out.finish_reason("stop") == "tool_calls" and out.finish_reason("length") == "length"
    named = ChoiceOutput(
        plan_chat(
            req(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}), tok
        )
    )
    got = run(named, '{"city": "Rome"}')
    assert got["content"] == "" and json.loads(got["calls"][0]["arguments"]) == {"city": "Rome"}
    assert named.finish_reason("stop") == "stop"  # a named call finishes "stop", as OpenAI's do
    plain = ChoiceOutput(plan_chat(req(), tok))
    assert run(plain, "just text") == {"content": "just text", "reasoning": "", "calls": []}
