"""The llmray app on a real local Ray Serve, the real engine on the tiny model (CPU, torch kernels).

One Ray + Serve (start-up is slow on 2 cores; shared with test_serve_replicas.py: ``serve_local``), two apps
in turn:

1. the API through the `openai` client: one engine replica (max_num_seqs=4, so the replica holds
   max_ongoing_requests=8 + max_queued_requests=2 requests and answers 429 beyond), an API key, Ray
   metrics exported;
2. load: 300 concurrent streaming clients on one replica, a fifth hanging up mid-stream. Limits are set so
   no client gets a 429 (``max_ongoing_requests`` covers all 300; the engine batches 64, the rest wait in
   its core). The 240 clients that stay ask for 8 tokens and must each get a well-formed stream: role-less
   completion chunks, finish_reason "length", the usage chunk (8 tokens) and ``data: [DONE]``. The 60
   that leave ask for 64 tokens and hang up after their first chunk: their engine requests are aborted
   (the tokens generated in all stay far below 60 x 64) and free their KV blocks. Afterwards the engine
   is idle with every block free, the replica's and its engine core's memory are back near their
   warmed-up baseline, and the server still answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
import urllib.request
from types import SimpleNamespace

import httpx
import openai
import pytest
from serve_helpers import (
    AUTH,
    KEY,
    engine_stats,
    engine_under_test,
    replica_pids,
    rss_mb,
    sse_data,
    stream_completion,
    wait_for,
)

from llmray.serve.metrics import METRIC_NAMES

pytestmark = pytest.mark.timeout(300)
MODEL = "tiny"
LONG = {"max_tokens": 400, "temperature": 0, "extra_body": {"ignore_eos": True}}  # openai-client kwargs
LONG_JSON = {"max_tokens": 400, "temperature": 0, "ignore_eos": True}  # the same as raw JSON


@pytest.fixture(scope="module")
def session(serve_local):
    return serve_local  # Ray + Serve shared with test_serve_replicas.py (tests/conftest.py), metrics exported


@pytest.fixture(scope="module")
def app(session, tiny_model_dir):
    args = {
        "model": str(tiny_model_dir),
        "served_model_name": MODEL,
        "engine": engine_under_test(),
        "api_key": KEY,
        "engine_kwargs": {"max_num_seqs": 4, "num_kv_blocks": 128, "max_model_len": 512},
        "max_queued_requests": 2,
        "ingress_replicas": 1,
        "num_cpus": 0.25,
        "max_body_bytes": 1024 * 1024,
    }
    url = session.deploy(args)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    return SimpleNamespace(url=url, metrics_port=session.metrics_port, client=client)


def test_models_and_health(app):
    assert [m.id for m in app.client.models.list().data] == [MODEL]
    assert httpx.get(f"{app.url}/health").status_code == 200  # no key needed


def test_completions_and_chat_streamed_and_not(app):
    c = app.client
    body = {
        "model": MODEL,
        "prompt": "hello world",
        "max_tokens": 12,
        "extra_body": {"ignore_eos": True},
        "temperature": 0,
    }
    full = c.completions.create(**body)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    assert full.usage.prompt_tokens > 0 and full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(c.completions.create(**body, stream=True))
    assert len(chunks) >= 2 and "".join(ch.choices[0].text for ch in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = c.chat.completions.create(
        model=MODEL, messages=msgs, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 10
    stream = c.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert (
        "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        == chat.choices[0].message.content
    )
    assert parts[-1].choices == [] and parts[-1].usage.model_dump() == chat.usage.model_dump()

    # tokens stream as they are generated: the first chunk arrives long before the last
    t0 = time.perf_counter()
    times = [
        time.perf_counter() - t0 for _ in c.completions.create(model=MODEL, prompt="a", stream=True, **LONG)
    ]
    assert len(times) >= 10 and times[0] < 0.5 * times[-1], (len(times), times[0], times[-1])


def test_n_seed_stop_logprobs(app):
    c = app.client
    body = {
        "model": MODEL,
        "prompt": "the",
        "max_tokens": 16,
        "extra_body": {"ignore_eos": True},
        "temperature": 1.0,
    }
    a = c.completions.create(**body, n=3, seed=7)
    b = c.completions.create(**body, n=3, seed=7)
    assert [ch.index for ch in a.choices] == [0, 1, 2] and a.usage.completion_tokens == 48
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # seeded: reproducible
    assert len({ch.text for ch in a.choices}) >= 2  # choice i uses seed + i
    streamed = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], n=2, max_tokens=5, stream=True
    )
    assert {ch.choices[0].index for ch in streamed if ch.choices} == {0, 1}

    greedy = {
        "model": MODEL,
        "prompt": "ray serve",
        "max_tokens": 40,
        "extra_body": {"ignore_eos": True},
        "temperature": 0,
    }
    text = c.completions.create(**greedy).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = c.completions.create(**greedy, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]

    lp = c.completions.create(**{**greedy, "max_tokens": 6}, logprobs=3).choices[0].logprobs
    # (a dict keyed by token text: byte-level pieces that decode alike, e.g. to U+FFFD, share one key)
    assert len(lp.tokens) == 6 and all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and chosen == pytest.approx(max(top.values()), abs=1e-4)  # greedy = the top token
    chat_lp = (
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=4,
            logprobs=True,
            top_logprobs=2,
        )
        .choices[0]
        .logprobs.content
    )
    assert len(chat_lp) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in chat_lp)


def test_error_statuses(app):
    c = app.client
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="hello world", max_tokens=600)
    msg = e.value.body["message"]
    assert "512" in msg and "600" in msg and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="hi", temperature="hot")  # type: ignore[arg-type]
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-5", prompt="hi")
    bad = openai.OpenAI(base_url=f"{app.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{app.url}/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(
        f"{app.url}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": MODEL, "prompt": "x" * (2 * 1024 * 1024)},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # unknown fields are ignored
    ok = c.completions.create(
        model=MODEL, prompt="hi", max_tokens=2, extra_body={"brand_new_field": {"a": 1}}
    )
    assert ok.usage.completion_tokens >= 1


def test_queue_full_is_429(app):
    """12 long streams at once: the replica holds 10 (8 ongoing + 2 queued) and refuses the rest with 429 +
    Retry-After. A stream that got its 200 hangs up once a refusal was seen (its slot is then free again)."""
    refused = threading.Event()

    def one(i: int) -> tuple[int, str | None, dict | None]:
        body = {"model": MODEL, "prompt": f"request {i}", "stream": True, **LONG_JSON}
        with httpx.stream("POST", f"{app.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            if r.status_code != 200:
                r.read()
                refused.set()
                return r.status_code, r.headers.get("retry-after"), r.json()
            for _ in r.iter_lines():
                if refused.is_set():
                    break  # leaving closes the stream: the engine aborts the request
            return 200, None, None

    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    statuses = sorted(s for s, _, _ in results)
    assert statuses.count(200) >= 4 and statuses.count(429) >= 1, statuses
    rejected = [(h, b) for s, h, b in results if s == 429]
    assert all(h == "1" and b["error"]["type"] == "rate_limit_error" for h, b in rejected)
    assert wait_for(lambda: engine_stats()["num_running"] == 0, 30)  # every stream ended or was aborted


def test_disconnect_aborts_and_frees_blocks(app):
    before = engine_stats()
    assert wait_for(lambda: engine_stats()["num_running"] == 0, 30)
    body = {"model": MODEL, "prompt": "disconnect me", "stream": True, **LONG_JSON}
    with httpx.stream(
        "POST", f"{app.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as r:
        events = sse_data(r.iter_lines())
        assert next(events)["choices"][0]["index"] == 0
        next(events)
        assert engine_stats()["num_running"] == 1
    # the client went away: the engine request is aborted and every KV block is free again
    assert wait_for(lambda: engine_stats()["num_running"] == 0, 5)
    after = engine_stats()
    assert after["num_free_blocks"] == after["num_total_blocks"] and after["num_waiting"] == 0
    assert after["generation_tokens_total"] - before["generation_tokens_total"] < LONG_JSON["max_tokens"]


def test_metrics_exported_to_prometheus(app):
    prompt = "a shared prefix that spans more than two KV blocks of sixteen tokens each " * 2
    for _ in range(2):  # the second request hits the prefix cache
        app.client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    url = f"http://127.0.0.1:{app.metrics_port}/metrics"
    wanted = {f"ray_{n}" for n in METRIC_NAMES}

    def exported() -> set[str]:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {line.split("{")[0].split(" ")[0].removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
                for line in text.splitlines() if line.startswith("ray_llmray_")}  # fmt: skip

    assert wait_for(lambda: wanted <= exported(), 30, interval_s=1.0), wanted - exported()


# --- load ------------------------------------------------------------------------------------------------------
N_CLIENTS, N_LEAVE = 300, 60  # (was 500: still most of them queue past the batch of 64, in 40% less time)
STAY_TOKENS, LEAVE_TOKENS = 8, 64
MAX_GROWTH_MB = 64  # per process, after a warm-up run of the same shape


@pytest.fixture(scope="module")
def load_url(session, tiny_model_dir):
    args = {
        "model": str(tiny_model_dir),
        "served_model_name": MODEL,
        "api_key": KEY,
        "engine": "llmray",
        "engine_kwargs": {
            "max_num_seqs": 64,
            "num_kv_blocks": 512,
            "max_model_len": 256,
            "kernels": "torch",
        },
        "max_ongoing_requests": 600,  # every client is admitted: no 429 in this test
        "max_queued_requests": 600,
        "num_cpus": 0.5,
    }
    return session.deploy(args)


def _body(i: int, leave: bool) -> dict:
    return {
        "model": MODEL,
        "prompt": f"client {i} says hello",
        "max_tokens": LEAVE_TOKENS if leave else STAY_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


async def _crowd(url: str, n: int, n_leave: int):
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        jobs = []
        for i in range(n):
            leave = i % (n // n_leave) == 0 if n_leave else False
            jobs.append(
                stream_completion(client, url, _body(i, leave), disconnect_after=1 if leave else None)
            )
        return await asyncio.gather(*jobs)


def _check_stayer(res) -> None:
    assert res.status == 200 and res.exception is None and res.error is None, res
    assert res.done and not res.disconnected
    content = [c for c in res.chunks if c["choices"]]
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in res.chunks)
    assert len({c["id"] for c in res.chunks}) == 1
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    usage = res.chunks[-1]["usage"]
    assert res.chunks[-1]["choices"] == [] and usage["completion_tokens"] == STAY_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + STAY_TOKENS


def _idle() -> bool:
    s = engine_stats()
    return s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]


def _run_and_check(url: str) -> tuple[float, int]:
    """One crowd; returns (seconds, tokens the leavers generated before their abort)."""
    before = engine_stats()
    t0 = time.perf_counter()
    results = asyncio.run(_crowd(url, N_CLIENTS, N_LEAVE))
    elapsed = time.perf_counter() - t0

    stayers = [r for r in results if not r.disconnected]
    leavers = [r for r in results if r.disconnected]
    assert len(stayers) == N_CLIENTS - N_LEAVE and len(leavers) == N_LEAVE
    assert not [r for r in results if r.status == 429]
    for res in stayers:
        _check_stayer(res)
    assert all(r.status == 200 and r.chunks and r.error is None for r in leavers)

    # every aborted request leaves the engine: nothing running or waiting, every KV block free
    assert wait_for(_idle, 30), engine_stats()
    after = engine_stats()
    generated = after["generation_tokens_total"] - before["generation_tokens_total"]
    stay_tokens = (N_CLIENTS - N_LEAVE) * STAY_TOKENS
    # each leaver made >= 1 token, and together far fewer than the N_LEAVE x 64 they asked for: aborted
    assert stay_tokens + N_LEAVE <= generated < stay_tokens + N_LEAVE * LEAVE_TOKENS * 3 // 4, generated
    assert after["num_running"] == 0 and after["num_free_blocks"] == after["num_total_blocks"]
    return elapsed, generated - stay_tokens


@pytest.mark.timeout(400)
def test_streaming_crowd_with_a_fifth_disconnecting(load_url):
    url = load_url
    [replica] = replica_pids("LLMServer")
    core = engine_stats()["core_pid"]
    # first crowd: also the warm-up (allocator arenas, Ray streaming buffers reach their high-water mark)
    first = _run_and_check(url)
    base = {"replica": rss_mb(replica), "core": rss_mb(core)}
    second = _run_and_check(url)  # the same load again: memory must come back to the same level
    grown = {"replica": rss_mb(replica) - base["replica"], "core": rss_mb(core) - base["core"]}
    assert all(g < MAX_GROWTH_MB for g in grown.values()), grown
    assert replica_pids("LLMServer") == [replica]  # the same replica served it all

    # the server answers afterwards
    r = httpx.post(
        f"{url}/v1/completions", headers=AUTH, timeout=30,
        json={"model": MODEL, "prompt": "still there?", "max_tokens": 4, "temperature": 0, "ignore_eos": True},
    )  # fmt: skip
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    print(
        f"\n{N_CLIENTS} clients: {first[0]:.1f}s and {second[0]:.1f}s; leavers generated {first[1]} and "
        f"{second[1]} tokens (of {N_LEAVE * LEAVE_TOKENS} asked); RSS growth MB {grown}"
    )
