"""The OpenAI ingress alone: FastAPI TestClient over an in-process LLMServer with the mock engine (no Ray)."""

from __future__ import annotations

import json
import re

import pytest
from _support.local_backend import MOCK_ENGINE, LocalBackend
from fastapi.testclient import TestClient

from llmray.serve.ingress import IngressConfig, build_openai_app
from llmray.serve.server import LLMServer

MODEL = "mock-model"
KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_client(**engine_kwargs) -> tuple[TestClient, LLMServer]:
    server = LLMServer(
        "unused", MODEL, engine_factory=MOCK_ENGINE, engine_kwargs=engine_kwargs, enable_metrics=False
    )
    config = IngressConfig(MODEL, api_key=KEY, max_body_bytes=64 * 1024)
    return TestClient(build_openai_app(LocalBackend(server), config)), server


@pytest.fixture(scope="module")
def client() -> TestClient:
    return make_client(token_delay_s=0.0)[0]


def sse_events(text: str) -> list:
    lines = [ln[len("data: ") :] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]", text[-200:]
    return [json.loads(ln) for ln in lines[:-1]]


def test_models_and_health(client):
    r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [MODEL]  # adapters: test_serve_lora.py
    assert client.get("/health").status_code == 200  # open without a key


def test_models_card_names_the_engines_max_model_len():
    """Deployed without --max-model-len, the base model's card shows the engine's own context window."""
    client, server = make_client(token_delay_s=0.0, max_model_len=300)
    [card] = client.get("/v1/models", headers=AUTH).json()["data"]
    assert card["max_model_len"] == server.engine.max_model_len == 300
    config = IngressConfig(MODEL, api_key=KEY, max_model_len=128)  # set at deploy time: that one
    pinned = TestClient(build_openai_app(LocalBackend(server), config))
    assert pinned.get("/v1/models", headers=AUTH).json()["data"][0]["max_model_len"] == 128


def test_adapter_cards_name_the_base_engines_max_model_len(tmp_path):
    """An adapter runs in its base model's engine: its card shows that engine's context window, not null."""
    adapter = tmp_path / "chat"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    server = LLMServer("unused", MODEL, engine_factory=MOCK_ENGINE, engine_kwargs={"max_model_len": 300},
                       loras={"chat": str(adapter)}, enable_metrics=False)  # fmt: skip
    client = TestClient(build_openai_app(LocalBackend(server), IngressConfig(MODEL, dynamic_loras=True)))
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["chat"]["parent"] == MODEL
    assert cards["chat"]["max_model_len"] == cards[MODEL]["max_model_len"] == 300


def test_completions_non_streamed(client):
    body = {
        "model": MODEL,
        "prompt": "hello",
        "max_tokens": 7,
        "n": 3,
        "seed": 5,
        "logprobs": 2,
        "new_field": 1,
    }
    r = client.post("/v1/completions", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and len(out["choices"]) == 3
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 21, "total_tokens": 26}
    for c in out["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == 7 and len(lp["top_logprobs"][0]) == 2
        assert "".join(lp["tokens"]) == c["text"] and lp["text_offset"][1] == len(lp["tokens"][0])
    # seeded choices use seed+i: the same request again gives the same three texts
    again = client.post("/v1/completions", headers=AUTH, json=body).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in out["choices"]]


def test_batched_prompts_and_token_ids(client):
    body = {"model": MODEL, "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 3, "n": 2}
    out = client.post("/v1/completions", headers=AUTH, json=body).json()
    assert len(out["choices"]) == 4
    assert out["usage"]["prompt_tokens"] == 5 and out["usage"]["completion_tokens"] == 12


def test_chat_streamed_with_usage(client):
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        "max_completion_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "top_logprobs": 1,
    }
    r = client.post("/v1/chat/completions", headers=AUTH, json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [e for e in events if e["choices"]]
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"][0]["logprobs"]["content"]) for e in content) == 6
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6


def test_stop_string(client):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/completions", headers=AUTH, json=body).json()["choices"][0]["text"]
    stop = full[10:12]
    cut = client.post("/v1/completions", headers=AUTH, json={**body, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.index(stop)]


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 3.5}, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, "n"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 50}, "logprobs"),
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": True}, "echo"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "suffix": "x"}, "suffix"),
    ],
)
def test_400_names_the_field(client, path, body, param):
    r = client.post(path, headers=AUTH, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and param in err["message"] and err["code"] == "invalid_value"
    assert "Value error" not in err["message"]  # pydantic's wrapping is not shown


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"model": MODEL, "prompt": "a" * 300, "max_tokens": 5}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "a" * 100, "max_tokens": 200}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "a" * 300}]},
            "messages",
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "a" * 100}],
                "max_completion_tokens": 200,
            },
            "max_completion_tokens",
        ),
    ],
)
def test_over_the_context_window_is_context_length_exceeded(client, path, body, param):
    """Both endpoints answer OpenAI's code; a prompt that alone fills the window asks to shorten it."""
    r = client.post(path, headers=AUTH, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == param, err
    assert "at most 0" not in err["message"] and "256" in err["message"]
    if param in ("prompt", "messages"):
        assert f"shorten the {param}" in err["message"]
    else:
        assert re.search(rf"lower {param} to at most [1-9]\d+ ", err["message"]), err["message"]


@pytest.mark.parametrize(
    "path,extra,param",
    [
        ("/v1/completions", {"prompt": "snow \u2603 caf\u00e9"}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "caf\u00e9 \u2603"}]}, "messages"),
    ],
)
def test_text_the_tokenizer_cannot_encode_is_a_400_naming_the_characters(client, path, extra, param):
    r = client.post(path, headers=AUTH, json={"model": MODEL, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "unknown_characters"
    assert "U+2603 SNOWMAN" in err["message"] and "U+00E9" in err["message"], err["message"]
    assert "WordLevel" not in err["message"] and "[UNK]" not in err["message"]


def test_errors_statuses(client):
    # prompt + max_tokens over the context window: both numbers named
    r = client.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "hi", "max_tokens": 300})
    assert (
        r.status_code == 400
        and "2 tokens" in r.json()["error"]["message"]
        and "300" in r.json()["error"]["message"]
    )
    # the same, streamed: still a real status, not a 200 stream
    r = client.post(
        "/v1/completions",
        headers=AUTH,
        json={"model": MODEL, "prompt": "hi", "max_tokens": 300, "stream": True},
    )
    assert r.status_code == 400
    assert client.post("/v1/completions", headers=AUTH, content=b"{not json").status_code == 400
    assert client.post("/v1/completions", headers=AUTH, json=[1, 2]).status_code == 400
    # auth: missing and wrong key
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}).status_code == 401
    r = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.post("/v1/completions", headers=AUTH, json={"model": "gpt-9", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = client.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "x" * 70_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = client.get("/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()


def test_error_midway_is_an_sse_event():
    client, _ = make_client(token_delay_s=0.0, fail_after=3)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 10, "stream": True}
    r = client.post("/v1/completions", headers=AUTH, json=body)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert len("".join(e["choices"][0]["text"] for e in events[:-1])) == 3  # 3 one-character tokens
    assert events[-1]["error"]["code"] == 500 and "mock engine failure" in events[-1]["error"]["message"]
    # the same failure without streaming is a 500 in the envelope, not a stack trace
    r = client.post("/v1/completions", headers=AUTH, json={**body, "stream": False})
    assert r.status_code == 500 and "Traceback" not in r.text


def test_health_fails_when_engine_dead():
    client, server = make_client()
    server.check_health()
    server.engine.kill()
    with pytest.raises(RuntimeError, match="engine loop"):
        server.check_health()
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"


def test_backpressure_is_429_with_retry_after():
    from ray.serve.exceptions import BackPressureError

    class FullBackend:
        async def stream(self, kind, body, arrival_s, **_):
            raise BackPressureError(num_queued_requests=8, max_queued_requests=8)
            yield []  # pragma: no cover - makes this an async generator

    client = TestClient(build_openai_app(FullBackend(), IngressConfig(MODEL, retry_after_s=2)))
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_replica_backend_answers_429_past_its_limit():
    """The default deployment: the replica holds at most max_ongoing + max_queued requests, then 429."""
    from llmray.serve.backends import ReplicaBackend

    server = LLMServer("unused", MODEL, engine_factory=MOCK_ENGINE, enable_metrics=False)
    backend = ReplicaBackend(server, max_requests=2)
    client = TestClient(build_openai_app(backend, IngressConfig(MODEL, retry_after_s=3)))
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert client.post("/v1/completions", json=body).status_code == 200 and backend.ongoing == 0
    backend.ongoing = 2  # two requests held
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_engine_death_mid_stream_is_an_in_band_503():
    """A dead engine core mid-stream: the SSE stream ends with the retryable engine_unavailable, then [DONE]."""
    from llmray.engine.errors import EngineDeadError

    client, server = make_client(token_delay_s=0.0)
    real = server.engine.generate_stream

    async def dies(*args, **kwargs):
        n = 0
        async for out in real(*args, **kwargs):
            yield out
            n += 1
            if n == 3:
                raise EngineDeadError("the engine core process exited (exit code -9)")

    server.engine.generate_stream = dies
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 20, "stream": True, "ignore_eos": True}
    r = client.post("/v1/completions", json=body, headers=AUTH)
    events = sse_events(r.text)
    assert r.status_code == 200 and len(events) == 4
    assert events[-1]["error"]["code"] == "engine_unavailable"


def test_stream_interval_batches_tokens_per_chunk():
    server = LLMServer("unused", MODEL, engine_factory=MOCK_ENGINE, engine_kwargs={"token_delay_s": 0.002},
                       enable_metrics=False, stream_interval_ms=30)  # fmt: skip
    client = TestClient(build_openai_app(LocalBackend(server), IngressConfig(MODEL)))
    body = {
        "model": MODEL,
        "prompt": "hi",
        "max_tokens": 60,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
    }
    full = client.post("/v1/completions", json=body).json()["choices"][0]
    events = sse_events(client.post("/v1/completions", json={**body, "stream": True}).text)
    assert len(events[0]["choices"][0]["logprobs"]["tokens"]) == 1  # the first token is not held back
    assert len(events) < 30  # 60 tokens at 2 ms each, batched per 30 ms
    assert "".join(e["choices"][0]["text"] for e in events) == full["text"]
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events) == 60
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_request_id_is_echoed_and_prefixes_log_lines(caplog):
    import logging

    from llmray.serve.request_log import REQUEST_ID

    client, _ = make_client(token_delay_s=0.0)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    r = client.post("/v1/completions", json=body, headers={**AUTH, "X-Request-Id": "client-id-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-id-1"
    r = client.post(
        "/v1/completions", json={**body, "stream": True}, headers={**AUTH, "X-Request-Id": "client-id-2"}
    )
    assert r.headers["x-request-id"] == "client-id-2"
    made = client.post("/v1/completions", json=body, headers=AUTH).headers["x-request-id"]
    assert len(made) == 32
    bad = client.post("/v1/completions", json={}, headers={**AUTH, "X-Request-Id": "x" * 500})
    assert bad.status_code == 400 and len(bad.headers["x-request-id"]) == 32  # never echoed as given
    token = REQUEST_ID.set("client-id-3")
    try:
        with caplog.at_level(logging.INFO, logger="llmray.serve"):
            logging.getLogger("llmray.serve").info("working on it")
    finally:
        REQUEST_ID.reset(token)
    assert "[client-id-3] working on it" in caplog.text


def test_adapter_requests_are_observed_under_the_adapter_name(tmp_path, monkeypatch):
    """Per-request metrics carry the model the request asked for: an adapter's own name, not the base's."""
    from ray.serve import metrics as ray_metrics

    seen: list[tuple[str, str]] = []  # (metric, model_name) per observation

    class Recorder:
        def __init__(self, name, **_):
            self.name, self.default = name, {}

        def set_default_tags(self, tags):
            self.default = dict(tags)

        def observe(self, value, tags=None):
            seen.append((self.name, {**self.default, **(tags or {})}["model_name"]))

        inc = set = observe

    for kind in ("Histogram", "Counter", "Gauge"):
        monkeypatch.setattr(ray_metrics, kind, Recorder)
    adapter = tmp_path / "chat"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    server = LLMServer("unused", MODEL, engine_factory=MOCK_ENGINE, engine_kwargs={"token_delay_s": 0.0},
                       loras={"chat": str(adapter)}, enable_metrics=True)  # fmt: skip
    client = TestClient(build_openai_app(LocalBackend(server), IngressConfig(MODEL, dynamic_loras=True)))
    for model in ("chat", MODEL):
        r = client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200, r.text
    by_model = {m: {n for n, mm in seen if mm == m} for m in ("chat", MODEL)}
    wanted = {"llmray_time_to_first_token_seconds", "llmray_e2e_request_latency_seconds"}
    assert wanted | {"llmray_request_queue_time_seconds"} <= by_model["chat"], seen
    assert wanted <= by_model[MODEL], seen
    e2e = [m for n, m in seen if n == "llmray_e2e_request_latency_seconds"]
    assert sorted(e2e) == sorted(["chat", MODEL])  # one request each, each under its own name


class _DiesOnce:
    """A DeploymentHandle double: the first ``stream`` call's replica dies after ``died_after`` items."""

    def __init__(self, server: LLMServer, died_after: int) -> None:
        self.server, self.died_after, self.calls, self.cancelled = server, died_after, 0, 0
        self.stream = self

    def options(self, **_):
        return self

    def remote(self, kind, body, arrival_s, request_id):
        from ray.exceptions import ActorDiedError

        self.calls += 1
        first, handle = self.calls == 1, self

        class Gen:
            def __aiter__(self):
                return self.gen()

            async def gen(self):
                n = 0
                async for item in handle.server.stream(kind, body, arrival_s, request_id):
                    if first and n == handle.died_after:
                        raise ActorDiedError()
                    yield item
                    n += 1

            def cancel(self):
                handle.cancelled += 1

        return Gen()


@pytest.mark.parametrize("died_after", [0, 2])
def test_separate_ingress_resends_a_request_whose_replica_died_before_output(died_after):
    """HandleBackend: a replica lost before the request produced anything -> sent again (200, full answer);
    lost after output went out -> the retryable 503 in-band, not sent again."""
    from llmray.serve.backends import HandleBackend

    server = LLMServer("unused", MODEL, engine_factory=MOCK_ENGINE, engine_kwargs={"token_delay_s": 0.0},
                       enable_metrics=False)  # fmt: skip
    handle = _DiesOnce(server, died_after)
    client = TestClient(build_openai_app(HandleBackend(handle), IngressConfig(MODEL)))
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 8, "stream": True, "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    events = sse_events(r.text)
    assert r.status_code == 200
    if died_after == 0:
        assert handle.calls == 2 and "error" not in events[-1]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
    else:
        assert handle.calls == 1 and events[-1]["error"]["code"] == "engine_unavailable"


def test_a_broken_adapter_config_is_named_in_clean_words(tmp_path):
    """The reason a --lora-root directory is skipped reads as one sentence ("at at column" was one)."""
    from llmray.serve.lora_registry import adapter_problem

    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r"')
    why = adapter_problem(tmp_path)
    assert why == "adapter_config.json is not valid JSON (Expecting ':' delimiter, line 1 column 26)", why
    assert not re.search(r"\b(\w+) \1\b", why)  # no doubled word
