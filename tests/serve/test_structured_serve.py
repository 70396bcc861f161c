"""Structured outputs and forced tool calls through the official ``openai`` client against the app a Serve
replica runs (``LLMServerIngress``: the OpenAI app inside the LLMServer, the real engine, the tiny random-weight
model), in-process (no Ray: the Serve plumbing itself is covered by tests/serve/test_serve_app.py): every answer
that finishes "stop" validates against its schema because the grammar, not the weights, guarantees it."""

from __future__ import annotations

import concurrent.futures as cf
import json
from types import SimpleNamespace

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from llmray.serve.app import LLMServerIngress

KEY = "sk-llmray-test"
pytestmark = pytest.mark.timeout(600)
MODEL = "tiny"
PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "owner": {
            "type": "object",
            "properties": {"vip": {"type": "boolean"}},
            "required": ["vip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "maximum": 9},
            },
            "required": ["unit", "days"],
            "additionalProperties": False,
        },
    },
}
ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "parameters": {
            "type": "object",
            "properties": {"on": {"type": "boolean"}},
            "required": ["on"],
            "additionalProperties": False,
        },
    },
}


class Verdict(BaseModel):
    ok: bool
    level: int


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    engine_kwargs = {
        "max_num_seqs": 8,
        "num_kv_blocks": 256,
        "max_model_len": 1024,
        "enable_prefix_caching": False,  # alone vs mixed: the same prefill path, no cache hits
    }
    server = LLMServerIngress(
        str(tiny_model_dir),
        MODEL,
        engine_kwargs=engine_kwargs,
        enable_metrics=False,
        ingress_config={"served_model_name": MODEL, "api_key": KEY, "max_model_len": 1024},
        max_requests=None,
    )
    try:
        with TestClient(server.__serve_build_asgi_app__()) as http:  # one event loop for every request
            yield SimpleNamespace(
                client=openai.OpenAI(
                    base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0, timeout=120
                )
            )
    finally:
        server.engine.shutdown()


def ask(text: str = "Answer in JSON.") -> list[dict]:
    return [{"role": "user", "content": text}]


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}


def test_json_schema_and_json_object_validate(app):
    c = app.client
    for seed in (1, 2):
        r = c.chat.completions.create(
            model=MODEL, messages=ask(), response_format=schema_format(PET), seed=seed, max_tokens=300
        )
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), PET)
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=ask(),
            response_format=schema_format(PET),
            seed=3,
            max_tokens=300,
            stream=True,
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) > 2
    jsonschema.validate(json.loads(text), PET)
    obj = c.chat.completions.create(
        model=MODEL, messages=ask(), response_format={"type": "json_object"}, seed=4, max_tokens=300
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    comp = c.completions.create(
        model=MODEL,
        prompt="JSON:",
        max_tokens=300,
        seed=5,
        extra_body={"response_format": schema_format(PET)},
    )
    assert comp.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(comp.choices[0].text), PET)


def test_parse_with_a_pydantic_model(app):
    r = app.client.chat.completions.parse(
        model=MODEL, messages=ask(), response_format=Verdict, seed=7, max_tokens=200
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Verdict) and r.choices[0].finish_reason == "stop"


def test_named_and_required_tool_calls_validate(app):
    c = app.client
    named = c.chat.completions.create(
        model=MODEL,
        messages=ask("weather?"),
        tools=[WEATHER, ALARM],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        seed=1,
        max_tokens=200,
    )
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and named.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    for tools in ([ALARM], [WEATHER, ALARM]):
        r = c.chat.completions.create(
            model=MODEL, messages=ask("do it"), tools=tools, tool_choice="required", seed=2, max_tokens=200
        )
        call = r.choices[0].message.tool_calls[0]
        spec = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name in spec
        jsonschema.validate(json.loads(call.function.arguments), spec[call.function.name])
    stream = c.chat.completions.create(
        model=MODEL,
        messages=ask("alarm"),
        tools=[ALARM],
        tool_choice="required",
        seed=3,
        max_tokens=200,
        stream=True,
    )
    name, args = None, ""
    for ch in stream:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            name = tc.function.name or name
            args += tc.function.arguments or ""
    assert name == "set_alarm" and isinstance(json.loads(args)["on"], bool)


def test_bad_schema_is_a_400_naming_the_problem(app):
    bad = {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}
    with pytest.raises(openai.BadRequestError) as e:
        app.client.chat.completions.create(model=MODEL, messages=ask(), response_format=schema_format(bad))
    assert e.value.body["param"] == "response_format" and "nowhere" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        app.client.chat.completions.create(
            model=MODEL, messages=ask(), response_format=schema_format({"type": "array", "uniqueItems": True})
        )
    assert "uniqueItems" in e.value.body["message"]


def test_free_requests_get_the_same_tokens_beside_constrained_ones(app):
    c = app.client

    def free(seed: int) -> str:
        r = c.completions.create(
            model=MODEL, prompt=f"story {seed}", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        return r.choices[0].text

    def constrained(seed: int) -> str:
        r = c.chat.completions.create(
            model=MODEL, messages=ask(), response_format=schema_format(PET), seed=seed, max_tokens=300
        )
        return r.choices[0].message.content

    alone = [free(s) for s in (11, 12)]
    with cf.ThreadPoolExecutor(4) as pool:
        mixed = [
            pool.submit(constrained, 21),
            pool.submit(free, 11),
            pool.submit(constrained, 22),
            pool.submit(free, 12),
        ]
        results = [f.result() for f in mixed]
    assert [results[1], results[3]] == alone
    for text in (results[0], results[2]):
        jsonschema.validate(json.loads(text), PET)
