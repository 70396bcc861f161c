"""The llmray app on a real local Ray Serve over test-double engines: replicas that come, go and crash.

One Ray + Serve (starting them costs more than deploying a test-double app; shared with test_serve_app.py:
``serve_local``); each scenario
deploys its own app (``ServeSession.deploy`` replaces the one before):

- multiplexed LoRA routing over two ``LLMServer`` replicas behind a separate ingress (the mock engine);
- autoscaling: under load the engine deployment goes from 1 to 2 replicas, and back to 1 when idle;
- faults (the real serving stack and engine core process over the paced double, one LLMServer replica
  with a 1 s health check, one separate ingress): while streamed and non-streamed requests run, the
  replica's process is SIGKILLed (a crash, no cleanup). Every in-flight client ends well before its
  timeout with an error in the OpenAI envelope, as a retryable 503 ``engine_unavailable`` (an SSE
  ``data: {"error": ...}`` event then ``[DONE]`` for streams, a JSON body otherwise); Serve starts a new
  replica; ``/health`` answers promptly throughout (503 while no engine can answer, 200 after); requests
  sent after the crash (or sent before it but not started: the ingress sends them again) wait for the new
  replica, and they and later ones succeed with the same greedy output as before the crash; the killed
  replica's engine core process exits too (no orphan holds the device). Then the engine core process alone
  is SIGKILLed mid-stream: every stream gets the 503 in-band, the replica turns unhealthy and Serve
  replaces it. Last, deleting the app while requests stream drains them: each finishes with all its tokens.

The paced double (``tests/_support/paced_engine.py``: 20 ms steps, no model) makes a new replica ready in
seconds; replicas ask for a fraction of a CPU (Ray has 8 logical CPUs on the 2-core CI machine).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest
from _support.load import streaming_load
from _support.local_backend import MOCK_ENGINE
from _support.paced_engine import write_tokenizer_dir
from serve_helpers import (
    AUTH,
    KEY,
    engine_stats,
    fake_adapter,
    llm_server_handle,
    replica_count,
    replica_pids,
    sse_data,
    stream_completion,
    wait_for,
)

pytestmark = pytest.mark.timeout(400)
MODEL = "tiny"
CLIENT_TIMEOUT_S = 60.0
GREEDY = {"model": MODEL, "prompt": "the same prompt", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
LONG = {"model": MODEL, "max_tokens": 200, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def session(serve_local):
    return serve_local  # Ray + Serve shared with test_serve_app.py (tests/conftest.py)


@pytest.fixture(scope="module")
def paced_dir(tmp_path_factory):
    return str(write_tokenizer_dir(tmp_path_factory.mktemp("paced")))


# --- LoRA: two replicas, multiplexed routing, streaming -----------------------------------------------------
def test_two_replicas_route_adapter_requests(session, tmp_path):
    root = tmp_path / "loras"
    fake_adapter(root / "alpha")
    fake_adapter(root / "spare")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    args = {"model": str(model_dir), "served_model_name": MODEL, "engine_factory": MOCK_ENGINE, "api_key": KEY,
            "lora_root": str(root), "min_replicas": 2, "max_replicas": 2, "ingress_replicas": 1,
            "ingress_mode": "separate",  # multiplexed routing: a separate ingress calls through the handle
            "num_cpus": 0.25, "engine_kwargs": {"token_delay_s": 0.001}}  # fmt: skip
    url = session.deploy(args)
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert ids == [MODEL, "alpha", "spare"]
        fake_adapter(root / "later")  # copied in while serving
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "later", "lora_path": "later"})
        assert r.status_code == 200, r.text
        time.sleep(1.0)  # the replica reports its multiplexed ids to the router every 0.1 s
        body = {"model": "later", "prompt": "hi", "max_tokens": 5, "temperature": 0, "stream": True}
        texts = []
        for _ in range(4):  # multiplexed routing + streaming through the DeploymentHandle
            with http.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                events = list(sse_data(resp.iter_lines()))
            assert events[-1] == "[DONE]"
            texts.append("".join(e["choices"][0]["text"] for e in events[:-1]))
        assert len(set(texts)) == 1 and len(texts[0]) > 0
        # Serve routed every request to the replica that got the load call: the other never loaded it
        held = {tuple(llm_server_handle().model_info.remote().result()["loras_held"]) for _ in range(20)}
        assert held == {("later",), ()}
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "later"}).status_code == 200
        for _ in range(3):  # whichever replica answers, the unloaded adapter is gone
            r = http.post("/v1/completions", json={**body, "stream": False})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert not list(root.glob("*.tmp"))  # every registry write was replaced atomically


# --- autoscaling ------------------------------------------------------------------------------------------------
def test_autoscale_up_under_load_and_back_down(session, paced_dir):
    url = session.deploy(
        {
            "model": paced_dir,
            "served_model_name": MODEL,
            "engine_factory": "_support.paced_engine:PacedAsyncLLM",
            "api_key": KEY,
            "engine_kwargs": {"max_num_seqs": 8, "max_model_len": 512, "step_ms": 20},
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "autoscaling_overrides": {
                "upscale_delay_s": 0.5,
                "downscale_delay_s": 2.0,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 1.0,
            },
            "num_cpus": 0.25,
        }
    )
    assert replica_count() == 1
    bodies = [
        {"model": MODEL, "prompt": f"load {i}", "max_tokens": 300, "ignore_eos": True, "stream": True}
        for i in range(4)
    ]
    with streaming_load(f"{url}/v1/completions", bodies, KEY) as statuses:
        assert wait_for(lambda: replica_count() == 2, 60, interval_s=0.5), "never scaled to 2 replicas"
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert wait_for(lambda: replica_count() == 1, 60, interval_s=0.5), "never scaled back to 1 replica"


# --- faults ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def url(session, paced_dir):
    return session.deploy(
        {
            "model": paced_dir,
            "served_model_name": MODEL,
            "api_key": KEY,
            # the engine core process runs the paced double: a replica and its core restart in seconds;
            # 20 ms steps keep 200-token requests running for 4 s
            "engine_factory": "_support.paced_engine:PacedAsyncLLM",
            "engine_kwargs": {"max_num_seqs": 16, "max_model_len": 512, "step_ms": 20},
            # the ingress as a deployment of its own: it outlives the killed engine replica and reports the
            # cut streams in-band (in the default layout the HTTP server dies with the replica: a cut connection)
            "ingress_mode": "separate",
            "ingress_replicas": 1,
            "num_cpus": 0.5,
            "health_check_period_s": 1.0,
            "stream_interval_ms": 0,
        }
    )


def _greedy_text(url: str) -> str:
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, json=GREEDY, timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _health(url: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        status = httpx.get(f"{url}/health", timeout=CLIENT_TIMEOUT_S).status_code
    except httpx.HTTPError:
        status = -1
    return status, time.perf_counter() - t0


async def _non_streamed(client: httpx.AsyncClient, url: str, i: int) -> tuple[int, dict, float]:
    t0 = time.perf_counter()
    body = {**LONG, "prompt": f"non streamed {i}"}
    r = await client.post(f"{url}/v1/completions", headers=AUTH, json=body, timeout=CLIENT_TIMEOUT_S)
    return r.status_code, r.json(), time.perf_counter() - t0


async def _greedy(client: httpx.AsyncClient, url: str) -> tuple[int, str]:
    r = await client.post(f"{url}/v1/completions", headers=AUTH, json=GREEDY, timeout=CLIENT_TIMEOUT_S)
    return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _all_running(tokens_before: int, n: int = 16) -> bool:
    """All ``n`` requests run in the engine and have made tokens (the first reached the ingress)."""
    s = engine_stats()
    return s["num_running"] == n and s["generation_tokens_total"] >= tokens_before + n * 2


def _envelope(err: dict) -> bool:
    return set(err) >= {"message", "type", "param", "code"} and isinstance(err["message"], str)


def test_replica_crash_mid_load(url):
    before_text = _greedy_text(url)
    [pid] = replica_pids("LLMServer")
    stats = engine_stats()
    core_pid, tokens_before = stats["core_pid"], stats["generation_tokens_total"]
    health_log: list[tuple[int, float]] = []

    async def scenario():
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
            streams = [
                asyncio.create_task(stream_completion(client, url, {**LONG, "prompt": f"stream {i}"}))
                for i in range(12)
            ]
            plain = [asyncio.create_task(_non_streamed(client, url, i)) for i in range(4)]
            # all 16 run in the engine (its whole batch) and have produced tokens: every one is in flight
            running = await asyncio.to_thread(wait_for, lambda: _all_running(tokens_before), 30, 0.1)
            assert running, engine_stats()
            await asyncio.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            t_kill = time.perf_counter()
            await asyncio.sleep(0.5)
            # sent after the crash, not in flight: they wait for the new replica and succeed
            later = [asyncio.create_task(_greedy(client, url)) for _ in range(3)]
            for _ in range(3):  # /health while the replica is gone: prompt, never hanging
                health_log.append(await asyncio.to_thread(_health, url))
            return (
                await asyncio.gather(*streams),
                await asyncio.gather(*plain),
                await asyncio.gather(*later),
                t_kill,
            )

    t0 = time.perf_counter()
    streamed, plain, later, t_kill = asyncio.run(scenario())
    assert time.perf_counter() - t0 < CLIENT_TIMEOUT_S  # nobody hung until the client timeout

    for res in streamed:
        assert res.status == 200 and res.exception is None, res
        assert res.done  # the stream was closed properly with [DONE]
        assert len(res.chunks) >= 1  # it was in flight when the replica died
        finished = [c for c in res.chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        if not finished:  # cut by the crash: told so in-band, in the envelope, as retryable
            assert res.error is not None and _envelope(res.error), res
            assert res.error["code"] == "engine_unavailable" and res.error["type"] == "service_unavailable"
    assert sum(r.error is not None for r in streamed) >= 6  # most of them were cut mid-stream
    for status, body, _ in plain:
        if status != 200:
            assert status == 503 and _envelope(body["error"]), (status, body)
            assert body["error"]["code"] == "engine_unavailable"
    assert any(status != 200 for status, _, _ in plain)

    assert later == [(200, before_text)] * 3, later
    assert wait_for(lambda: not _pid_alive(core_pid), 15), "the engine core outlived its replica"
    # /health is prompt whether or not a replica answers: 503 while none does within 3 s, 200 once the new one
    # has loaded (on a fast host that can already be the first probe, so which one we see is not asserted)
    for status, seconds in health_log:
        assert status in (200, 503) and seconds < 6, health_log

    # Serve replaces the replica; /health reports it; requests succeed again with the same greedy output
    assert wait_for(lambda: replica_pids("LLMServer") not in ([], [pid]), 90, interval_s=1.0)
    assert wait_for(lambda: _health(url)[0] == 200, 60, interval_s=0.5)
    [new_pid] = replica_pids("LLMServer")
    assert new_pid != pid
    assert [_greedy_text(url) for _ in range(3)] == [before_text] * 3
    cut = next(r.error for r in streamed if r.error)
    failed = next(body for status, body, _ in plain if status != 200)
    print(
        f"\nhealth after the kill: {health_log}; recovered {time.perf_counter() - t_kill:.1f}s after it; "
        f"stream error {cut}; non-streamed error {failed}; {sum(r.error is not None for r in streamed)}/12 "
        f"streams and {sum(st != 200 for st, _, _ in plain)}/4 non-streamed requests cut"
    )


def test_engine_core_killed_mid_stream(url):
    """The engine core process (not the replica) dies: every stream ends with the retryable 503 in-band,
    /health turns 503 (the replica reports its dead core), and Serve replaces the replica."""
    assert wait_for(lambda: _health(url)[0] == 200, 120, interval_s=0.5)
    before_text = _greedy_text(url)
    [pid] = replica_pids("LLMServer")
    stats = engine_stats()
    core_pid, tokens_before = stats["core_pid"], stats["generation_tokens_total"]
    assert core_pid not in (None, pid)

    async def scenario():
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
            streams = [
                asyncio.create_task(stream_completion(client, url, {**LONG, "prompt": f"core {i}"}))
                for i in range(8)
            ]
            running = await asyncio.to_thread(wait_for, lambda: _all_running(tokens_before, 8), 30, 0.1)
            assert running, engine_stats()
            await asyncio.sleep(0.5)
            os.kill(core_pid, signal.SIGKILL)
            return await asyncio.gather(*streams)

    streamed = asyncio.run(scenario())
    for res in streamed:
        assert res.status == 200 and res.exception is None and res.done, res
        finished = [c for c in res.chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        if not finished:
            assert res.error is not None and _envelope(res.error), res
            assert res.error["code"] == "engine_unavailable" and res.error["type"] == "service_unavailable"
    assert sum(r.error is not None for r in streamed) >= 6
    assert _health(url)[0] == 503 or replica_pids("LLMServer") != [pid]  # unhealthy until replaced
    assert wait_for(lambda: replica_pids("LLMServer") not in ([], [pid]), 120, interval_s=1.0)
    assert wait_for(lambda: _health(url)[0] == 200, 90, interval_s=0.5)
    assert engine_stats()["core_pid"] != core_pid
    assert _greedy_text(url) == before_text


def test_graceful_shutdown_drains_in_flight_requests(url):
    from ray import serve

    async def scenario():
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
            streams = [
                asyncio.create_task(
                    stream_completion(client, url, {**LONG, "max_tokens": 120, "prompt": f"drain {i}"})
                )
                for i in range(6)
            ]
            await asyncio.sleep(1.0)
            deleter = threading.Thread(target=serve.delete, args=("llmray",), daemon=True)
            deleter.start()  # the app goes away while they stream
            results = await asyncio.gather(*streams)
            await asyncio.to_thread(deleter.join, 60)
            return results

    results = asyncio.run(scenario())
    for res in results:
        assert res.status == 200 and res.exception is None and res.error is None, res
        assert res.done
        assert res.chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in res.chunks if c["choices"]) >= 2
    assert "llmray" not in serve.status().applications  # and the app is gone


def test_deployments_drain_for_longer_than_serves_default(tmp_path):
    """Serve's default graceful_shutdown_timeout_s (20 s) would cut long generations at downscale."""
    from llmray.serve.app import build_app

    app = build_app({"model": str(tmp_path), "engine_factory": MOCK_ENGINE})
    assert (
        app._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 120.0
    )  # the HTTP app's replica
    app = build_app({"model": str(tmp_path), "engine_factory": MOCK_ENGINE, "ingress_mode": "separate"})
    ingress = app._bound_deployment
    llm_server = ingress.init_args[0]._bound_deployment
    for dep in (ingress, llm_server):
        assert dep._deployment_config.graceful_shutdown_timeout_s == 120.0
    app = build_app(
        {"model": str(tmp_path), "engine_factory": MOCK_ENGINE, "graceful_shutdown_timeout_s": 600}
    )
    assert app._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 600
