"""Ray streaming messages per request are bounded by the stream interval, not by the token count.

Each item ``LLMServer.stream`` yields is one Ray streaming message from the replica to the ingress. On the
real engine (its core in its own process), a 64-token request with a 50 ms interval yields at most once per
interval (+ the first token and the finishing chunk), far fewer times than it has tokens; with the interval
off it yields about once per engine step. The tokens and text are the same either way.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from llmray.serve.server import LLMServer

BODY = {
    "model": "tiny",
    "prompt": "count the messages",
    "max_tokens": 64,
    "temperature": 0,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    kw = {"kernels": "torch", "max_model_len": 256, "num_kv_blocks": 128}
    s = LLMServer(str(tiny_model_dir), "tiny", engine_kwargs=kw, enable_metrics=False, stream_interval_ms=50)
    yield s
    s.engine.shutdown()


def _run(server: LLMServer, interval_s: float) -> tuple[list[list[dict]], float]:
    server.stream_interval_s = interval_s

    async def main():
        t0 = time.perf_counter()
        msgs = [m async for m in server.stream("completions", dict(BODY))]
        return msgs, time.perf_counter() - t0

    return asyncio.run(main())


def test_messages_per_request_follow_the_interval(server):
    msgs, seconds = _run(server, 0.05)
    events = [ev for m in msgs for ev in m]
    assert sum(ev["num_tokens"] for ev in events) == 64 and events[-1]["finish_reason"] == "length"
    assert events[0]["num_tokens"] == 1  # the first token is not held back
    assert len(msgs) <= math.ceil(seconds / 0.05) + 2, (len(msgs), seconds)
    assert len(msgs) < 64

    unbatched, _ = _run(server, 0.0)
    text = "".join(ev["text"] for m in unbatched for ev in m)
    assert text == "".join(ev["text"] for ev in events)
    print(f"\n64 tokens: {len(msgs)} messages at 50 ms ({seconds:.2f} s), {len(unbatched)} without batching")
