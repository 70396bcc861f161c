"""KV-cache pressure: more requests than the cache holds preempt, all finish, greedy tokens unchanged.

The uncontended reference is the same engine with a cache large enough that nothing is preempted. Under
pressure (``num_kv_blocks`` far below what the batch needs) the scheduler preempts by recompute; every
request must still complete with exactly the reference's greedy tokens, and every block must be free at
the end. The streaming engine (``AsyncLLM``) is also driven with aborts mid-way under the same pressure.
Also here: engine defects found by the serve fuzzing (E1-E4 in docs/reliability.md), fixed in the engine.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from llmray.engine.llm import LLM, AsyncLLM
from llmray.engine.sampling_params import SamplingParams

BLOCK = 4
MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    from llmray.config import ModelConfig
    from llmray.model.qwen3 import Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="torch").eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [
        torch.randint(0, 512, (int(n),), generator=g).tolist()
        for n in torch.randint(3, 30, (24,), generator=g)
    ]


@pytest.fixture(scope="module")
def reference(model, prompts) -> list[list[int]]:
    llm = LLM.from_model(model, kernels="torch", block_size=BLOCK, num_kv_blocks=1024, max_num_seqs=64)
    outs = llm.generate(prompts, GREEDY)
    assert llm.stats()["num_preemptions"] == 0  # uncontended
    return [o.token_ids for o in outs]


def blocks_needed(prompts: list[list[int]]) -> int:
    return sum(-(-(len(p) + MAX_TOKENS) // BLOCK) for p in prompts)


@pytest.mark.parametrize("caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_preemption_keeps_greedy_outputs(model, prompts, reference, caching):
    num_blocks = 16  # a 41-token sequence needs 11 blocks; all 24 need ~7x more than the cache holds
    assert blocks_needed(prompts) > 5 * num_blocks
    llm = LLM.from_model(
        model, kernels="torch", block_size=BLOCK, num_kv_blocks=num_blocks, max_num_seqs=24,
        enable_prefix_caching=caching,
    )  # fmt: skip
    outs = llm.generate(prompts, GREEDY)
    stats = llm.stats()
    assert stats["num_preemptions"] > 0, stats
    assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
    assert [o.token_ids for o in outs] == reference
    assert stats["num_free_blocks"] == stats["num_total_blocks"] == num_blocks
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


def test_streaming_under_pressure_with_aborts(model, prompts, reference):
    """Every fourth stream is dropped after its second token; the rest finish with the reference tokens."""
    llm = AsyncLLM.from_model(model, kernels="torch", block_size=BLOCK, num_kv_blocks=16, max_num_seqs=24)

    async def one(i: int) -> list[int] | None:
        got: list[int] = []
        async for out in llm.generate_stream(prompts[i], GREEDY, request_id=f"r{i}"):
            got = out.token_ids
            if i % 4 == 0 and len(got) >= 2:
                return None  # leaving the loop aborts the request
        return got

    async def run() -> list[list[int] | None]:
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    try:
        results = asyncio.run(run())
        for i, got in enumerate(results):
            assert (got is None) == (i % 4 == 0)
            if got is not None:
                assert got == reference[i], i
        deadline = 50
        while llm.stats()["num_running"] + llm.stats()["num_waiting"] and deadline:
            asyncio.run(asyncio.sleep(0.05))
            deadline -= 1
        stats = llm.stats()
        assert stats["num_preemptions"] > 0
        assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["num_running"] == 0
        assert llm.is_alive()
    finally:
        llm.shutdown()


# --- engine defects found by tests/reliability (E1-E4 in docs/reliability.md), fixed in the engine ----------
def test_engine_tiny_temperature_is_greedy(model, prompts, reference):
    llm = LLM.from_model(model, kernels="torch", block_size=BLOCK)
    out = llm.generate(
        prompts[:1], SamplingParams(max_tokens=MAX_TOKENS, temperature=1e-300, ignore_eos=True)
    )
    assert out[0].token_ids == reference[0]


def test_engine_tiny_top_p_keeps_the_top_token(model, prompts, reference):
    llm = LLM.from_model(model, kernels="torch", block_size=BLOCK)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=1e-300, ignore_eos=True, seed=1)
    assert llm.generate(prompts[:1], params)[0].token_ids == reference[0]


def test_engine_survives_a_request_with_an_overflowing_top_k(model, prompts, reference):
    llm = AsyncLLM.from_model(model, kernels="torch", block_size=BLOCK)

    async def run() -> list[int]:
        try:  # either refused up front (ValueError) or failed alone; the engine must keep serving
            async for _ in llm.generate_stream(prompts[0], SamplingParams(max_tokens=2, top_k=10**30)):
                pass
        except (ValueError, RuntimeError):
            pass
        got: list[int] = []
        async for out in llm.generate_stream(prompts[0], GREEDY):
            got = out.token_ids
        return got

    try:
        assert asyncio.run(run()) == reference[0]
        assert llm.is_alive()
    finally:
        llm.shutdown()


def test_engine_refuses_stop_token_ids_outside_the_vocabulary(model, prompts):
    llm = LLM.from_model(model, kernels="torch", block_size=BLOCK)
    with pytest.raises(ValueError, match="stop_token_ids"):  # refused up front, not an IndexError mid-step
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[10**6]))
