"""AsyncLLM: streaming deltas, abort when the consumer stops, errors for bad requests, a dead loop reported."""

from __future__ import annotations

import asyncio
import threading

import pytest

from llmray.engine.llm import AsyncLLM
from llmray.engine.sampling_params import SamplingParams
from llmray.model.generate import generate


@pytest.fixture
def engine(tiny_model):
    llm = AsyncLLM.from_model(tiny_model, kernels="torch", block_size=4, max_model_len=128)
    yield llm
    llm.shutdown()


def test_stream_matches_reference_and_deltas_add_up(engine, tiny_model):
    prompts = [list(range(3, 20)), list(range(40, 45))]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    async def consume(p):
        outs = [o async for o in engine.generate_stream(p, params)]
        return outs

    async def main():
        return await asyncio.gather(*(consume(p) for p in prompts))

    results = asyncio.run(main())
    for p, outs in zip(prompts, results, strict=True):
        assert outs[-1].finish_reason == "length" and all(o.finish_reason is None for o in outs[:-1])
        assert sum((o.new_token_ids for o in outs), []) == outs[-1].token_ids == generate(tiny_model, p, 6)
    s = engine.stats()
    assert s["generation_tokens_total"] == 12 and s["num_running"] == 0 and engine.is_alive()
    assert s["num_free_blocks"] == s["num_total_blocks"]


def test_consumer_that_stops_aborts_and_frees_blocks(engine):
    async def main():
        params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        n = 0
        async for _ in engine.generate_stream(list(range(10)), params, request_id="x"):
            n += 1
            if n == 2:
                break
        for _ in range(100):
            await asyncio.sleep(0.02)
            if engine.stats()["num_running"] == 0:
                break
        return n

    assert asyncio.run(main()) == 2
    s = engine.stats()
    assert s["num_running"] == 0 and s["num_waiting"] == 0
    assert s["num_free_blocks"] == s["num_total_blocks"]


def test_abort_by_id_ends_the_stream(engine, monkeypatch):
    # the core holds its next step once 3 tokens are out until the abort is sent: the request cannot run to
    # its 120 tokens first however the threads are scheduled (and a wake-up may carry several tokens)
    sent = threading.Event()
    step = engine.engine.step

    def held_step():
        if engine.engine.generation_tokens_total >= 3:
            sent.wait(10)
        return step()

    monkeypatch.setattr(engine.engine, "step", held_step)

    async def main():
        params = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
        last = None
        async for out in engine.generate_stream([5, 6, 7], params, request_id="a"):
            last = out
            if len(out.token_ids) >= 3 and not sent.is_set():
                await engine.abort("a")
                sent.set()
        return last

    last = asyncio.run(main())
    assert last.finish_reason == "abort" and len(last.token_ids) < 120


def test_bad_request_raises_value_error(engine):
    async def main():
        async for _ in engine.generate_stream(list(range(100)), SamplingParams(max_tokens=50)):
            pass

    with pytest.raises(ValueError, match="100 tokens and max_tokens=50"):
        asyncio.run(main())
    assert engine.is_alive()


def test_a_failed_step_fails_its_requests_and_the_engine_keeps_serving(engine, monkeypatch, tiny_model):
    launch = engine.engine.runner.launch
    calls = [0]

    def fails_once(*a, **k):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("one bad step")
        return launch(*a, **k)

    monkeypatch.setattr(engine.engine.runner, "launch", fails_once)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def main():
        return [o async for o in engine.generate_stream([1, 2, 3], params)]

    with pytest.raises(RuntimeError, match="engine step failed.*one bad step"):
        asyncio.run(main())
    assert engine.is_alive()
    assert asyncio.run(main())[-1].token_ids == generate(tiny_model, [1, 2, 3], 4)
    s = engine.stats()
    assert s["num_running"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]


def test_dead_loop_is_reported(engine, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.engine.runner, "launch", boom)

    async def main():
        async for _ in engine.generate_stream([1, 2, 3], SamplingParams(max_tokens=4)):
            pass

    with pytest.raises(RuntimeError, match="engine step failed.*device lost"):
        asyncio.run(main())  # the first failure fails its requests only
    with pytest.raises(RuntimeError, match="device lost"):
        asyncio.run(main())  # a second failure in a row ends the loop
    assert not engine.is_alive()
    with pytest.raises(RuntimeError, match="engine loop died"):
        asyncio.run(main())
