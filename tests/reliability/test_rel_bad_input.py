"""Bad input never gets a 5xx: schemathesis over the served OpenAPI schema, then hand-written cases.

The app is the real ingress + ``LLMServer`` in-process over the mock engine (``LocalBackend``, no Ray): the
engine is not the point here, the HTTP boundary is. Every hand-written case must be a 4xx in the OpenAI
error envelope whose ``param`` names the offending field (or whose ``code`` names the body problem).
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from _support.local_backend import MOCK_ENGINE, LocalBackend
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from llmray.serve.errors import MAX_MESSAGE_CHARS
from llmray.serve.ingress import IngressConfig, build_openai_app
from llmray.serve.server import LLMServer

MODEL = "mock-model"
KEY = "sk-rel"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 2 * 1024 * 1024


def make_app():
    server = LLMServer(
        "unused",
        MODEL,
        engine_factory=MOCK_ENGINE,
        engine_kwargs={"token_delay_s": 0.0, "max_model_len": 256},
        enable_metrics=False,
    )
    config = IngressConfig(MODEL, api_key=KEY, max_body_bytes=MAX_BODY, max_model_len=256)
    return build_openai_app(LocalBackend(server), config)


APP = make_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
SEEN: dict[str, list[int]] = {}


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(APP, raise_server_exceptions=False)


def test_served_schema_describes_request_bodies(client):
    spec = client.get("/openapi.json").json()
    for path, required in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert {"model", required} <= set(body["required"]) and "max_tokens" in body["properties"]
    assert "$ref" not in json.dumps(spec)  # self-contained: fuzzers and SDK generators resolve nothing


@schema.parametrize()
@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_schemathesis_no_5xx(case):
    """A few hundred generated requests (valid and invalid) over every operation: zero 5xx."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL  # reach the engine (unknown models are a hand-written case below)
    response = case.call(headers=AUTH)
    SEEN.setdefault(f"{case.method} {case.path}", []).append(response.status_code)
    assert response.status_code < 500, (case.body, response.text[:500])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert {"message", "type", "param", "code"} <= set(err) and len(
            err["message"]
        ) <= MAX_MESSAGE_CHARS + 40


def test_schemathesis_covered_every_operation():
    """Runs after the generated cases (pytest keeps file order): they exercised every route, 2xx and 4xx."""
    if not SEEN:
        pytest.skip("run together with test_schemathesis_no_5xx")
    assert set(SEEN) >= {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health"}
    posts = SEEN["POST /v1/completions"] + SEEN["POST /v1/chat/completions"]
    assert sum(len(v) for v in SEEN.values()) >= 200
    print(
        f"\nschemathesis (mock engine): {sum(len(v) for v in SEEN.values())} requests, {len(SEEN)} operations"
    )
    assert any(s == 200 for s in posts) and any(400 <= s < 500 for s in posts)


@pytest.fixture(scope="module")
def real_engine(tiny_model_dir):
    """The same app over the real engine (tiny model, a 64-token window keeps generated requests short)."""
    server = LLMServer(
        str(tiny_model_dir),
        MODEL,
        engine_kwargs={"max_model_len": 64, "num_kv_blocks": 256, "max_num_seqs": 32, "kernels": "torch"},
        enable_metrics=False,
    )
    yield server, build_openai_app(LocalBackend(server), IngressConfig(MODEL, api_key=KEY, max_model_len=64))
    server.engine.shutdown()


def test_schemathesis_real_engine_no_5xx(real_engine):
    """Valid generated requests through the real engine: no 5xx, and the engine loop stays alive."""
    server, app = real_engine
    real_schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    real_schema.config.generation.update(modes=[GenerationMode.POSITIVE])  # valid bodies reach the engine
    statuses: list[int] = []
    for path in ("/v1/completions", "/v1/chat/completions"):

        @given(case=real_schema[path]["POST"].as_strategy())
        @settings(max_examples=60, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def run(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = MODEL
            response = case.call(headers=AUTH)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.body, response.text[:500])
            assert server.engine.is_alive()

        run()
    assert len(statuses) >= 100 and statuses.count(200) >= 20, sorted(set(statuses))


def _post(client: TestClient, body: bytes | dict | list | str, path: str = "/v1/completions"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=data, headers={**AUTH, "Content-Type": "application/json"})


OK = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
# (case id, path, raw body, expected status, expected param (None: a body-level error), expected code)
CASES = [
    ("not-json", "/v1/completions", b"{model: nope", 400, None, "invalid_json"),
    ("empty-body", "/v1/completions", b"", 400, None, "invalid_json"),
    ("json-array", "/v1/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("json-string", "/v1/chat/completions", b'"hello"', 400, None, "invalid_json"),
    ("json-number", "/v1/completions", b"42", 400, None, "invalid_json"),
    ("invalid-utf8", "/v1/completions", b'{"model": "mock-model", "prompt": "\xff\xfe"}', 400, None, "invalid_json"),
    ("lone-surrogate", "/v1/completions", {**OK, "prompt": "\ud800 x"}, 400, "prompt", "invalid_value"),
    ("lone-surrogate-chat", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "a\udfffb"}]}, 400, "messages[0].content", "invalid_value"),
    ("missing-prompt", "/v1/completions", {"model": MODEL}, 400, "prompt", "invalid_value"),
    ("prompt-wrong-type", "/v1/completions", {**OK, "prompt": 12}, 400, "prompt", "invalid_value"),
    ("max-tokens-string", "/v1/completions", {**OK, "max_tokens": "ten"}, 400, "max_tokens", "invalid_value"),
    ("messages-string", "/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", "invalid_value"),
    ("bad-role", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "root", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ("max-tokens-negative", "/v1/completions", {**OK, "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    ("max-tokens-zero", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("max-tokens-huge", "/v1/completions", {**OK, "max_tokens": 10**9}, 400, "max_tokens",
     "context_length_exceeded"),
    ("max-tokens-overflow", "/v1/completions", {**OK, "max_tokens": 10**30}, 400, "max_tokens", "invalid_value"),
    ("max-completion-tokens-huge", "/v1/chat/completions", {**CHAT, "max_completion_tokens": 10**9}, 400,
     "max_completion_tokens", "context_length_exceeded"),
    ("n-zero", "/v1/completions", {**OK, "n": 0}, 400, "n", "invalid_value"),
    ("n-1000", "/v1/chat/completions", {**CHAT, "n": 1000}, 400, "n", "invalid_value"),
    ("empty-prompt", "/v1/completions", {**OK, "prompt": ""}, 400, "prompt", None),
    ("empty-prompt-list", "/v1/completions", {**OK, "prompt": []}, 400, "prompt", "invalid_value"),
    ("empty-messages", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "invalid_value"),
    ("1mb-prompt", "/v1/completions", {**OK, "prompt": "a" * (1024 * 1024)}, 400, "prompt",
     "context_length_exceeded"),
    ("unknown-model", "/v1/completions", {**OK, "model": "gpt-9"}, 404, "model", "model_not_found"),
    ("stop-100", "/v1/completions", {**OK, "stop": [f"s{i}" for i in range(100)]}, 400, "stop", "invalid_value"),
    ("stop-empty-string", "/v1/completions", {**OK, "stop": ""}, 400, "stop", "invalid_value"),
    ("stop-token-id-huge", "/v1/completions", {**OK, "stop_token_ids": [2**70]}, 400, "stop_token_ids[0]",
     "invalid_value"),
    ("stop-token-id-outside-vocab", "/v1/completions", {**OK, "stop_token_ids": [100_000], "min_tokens": 2}, 400,
     "stop_token_ids", None),
    ("prompt-token-out-of-vocab", "/v1/completions", {**OK, "prompt": [1, 10**12]}, 400, "prompt", None),
    ("too-many-prompts", "/v1/completions", {**OK, "prompt": ["x"] * 1000}, 400, "prompt", "invalid_value"),
    ("nan-temperature", "/v1/completions", b'{"model": "mock-model", "prompt": "x", "temperature": NaN}', 400,
     "temperature", "invalid_value"),
    ("inf-repetition-penalty", "/v1/chat/completions",
     b'{"model": "mock-model", "messages": [{"role": "user", "content": "x"}], "repetition_penalty": Infinity}',
     400, "repetition_penalty", "invalid_value"),
    ("temperature-too-high", "/v1/completions", {**OK, "temperature": 7}, 400, "temperature", "invalid_value"),
    ("top-k-overflow", "/v1/completions", {**OK, "top_k": 10**30}, 400, "top_k", "invalid_value"),
    ("logprobs-100", "/v1/completions", {**OK, "logprobs": 100}, 400, "logprobs", "invalid_value"),
    ("top-logprobs-without-logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 3}, 400, "top_logprobs",
     "invalid_value"),
    ("echo-unsupported", "/v1/completions", {**OK, "echo": True}, 400, "echo", "invalid_value"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_a_4xx_naming_the_field(client, path, body, status, param, code):
    r = _post(client, body, path)
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert param.split("[")[0].split(".")[0] in err["message"], err["message"]
    assert len(err["message"]) <= MAX_MESSAGE_CHARS + 40  # never the 1 MB prompt back


def test_valid_requests_still_succeed(client):
    """The limits added for the cases above leave ordinary requests alone."""
    r = _post(client, {**OK, "stop": ["a", "b"], "stop_token_ids": [1, 2], "top_k": 50, "n": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    r = _post(client, {**CHAT, "stream": True}, "/v1/chat/completions")
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    # text the (char-level) tokenizer cannot encode is the client's 400, not a 500
    r = _post(client, {**OK, "prompt": "snow \u2603"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_wrong_method_and_unknown_route_use_the_envelope(client):
    r = client.get("/v1/completions", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/nope", headers=AUTH, json=OK)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
