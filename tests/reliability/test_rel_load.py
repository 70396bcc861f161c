"""Load: 500 concurrent streaming clients on one CPU replica of the real engine, a fifth hanging up mid-stream.

One LLMServer replica (tiny model, torch kernels, 2 shared cores) serving the HTTP app itself (the default
layout) behind the real Serve proxy.
Limits are set so no client gets a 429 (``max_ongoing_requests`` covers all 500; the engine batches 64 and
queues the rest). The 400 clients that stay ask for 8 tokens and must each get a well-formed stream: role-
less completion chunks, finish_reason "length", the usage chunk (8 tokens) and ``data: [DONE]``. The 100
that leave ask for 64 tokens and hang up after their first chunk: their engine requests are aborted (the
tokens generated in all stay far below 100 x 64) and free their KV blocks. Afterwards the engine is idle
with every block free, the replica's and its engine core's memory are back near their warmed-up baseline,
and the server still answers.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from rel_helpers import (
    AUTH,
    MODEL,
    engine_stats,
    replica_pids,
    rss_mb,
    serve_app,
    stream_completion,
    wait_for,
)

pytestmark = pytest.mark.timeout(400)
N_CLIENTS, N_LEAVE = 500, 100
STAY_TOKENS, LEAVE_TOKENS = 8, 64
MAX_GROWTH_MB = 64  # per process, after a warm-up run of the same shape


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    args = {
        "model": str(tiny_model_dir),
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
    with serve_app(args) as base:
        yield base


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
    """One crowd of 500; returns (seconds, tokens the 100 leavers generated before their abort)."""
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
    # each leaver made >= 1 token, and together far fewer than the 6,400 they asked for: they were aborted
    assert stay_tokens + N_LEAVE <= generated < stay_tokens + N_LEAVE * LEAVE_TOKENS * 3 // 4, generated
    assert after["num_running"] == 0 and after["num_free_blocks"] == after["num_total_blocks"]
    return elapsed, generated - stay_tokens


def test_500_streaming_clients_with_a_fifth_disconnecting(url):
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
        f"\n500 clients: {first[0]:.1f}s and {second[0]:.1f}s; leavers generated {first[1]} and "
        f"{second[1]} tokens (of {N_LEAVE * LEAVE_TOKENS} asked); RSS growth MB {grown}"
    )
