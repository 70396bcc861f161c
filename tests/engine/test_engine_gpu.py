"""Engine on CUDA (``-m gpu``): fp32 greedy equals the reference, CUDA graphs on/off agree, seeds are stable."""

from __future__ import annotations

import pytest
import torch
from _support.models import gpu_test_model

from llmray.engine.llm import LLM
from llmray.engine.sampling_params import SamplingParams
from llmray.model.generate import generate

pytestmark = pytest.mark.gpu


def _prompts(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [1, 7, 16, 33, 100, 257, 600, 1100][:n]
    return [torch.randint(0, 4096, (k,), generator=g).tolist() for k in lens]


def test_fp32_greedy_equals_reference():
    model = gpu_test_model(torch.float32)
    prompts = _prompts()
    refs = [generate(model, p, 24) for p in prompts]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    llm = LLM.from_model(model, dtype="float32", num_kv_blocks=2048, max_num_batched_tokens=512)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == refs
    outs = llm.generate(prompts, params)  # again, through the prefix cache
    assert [o.token_ids for o in outs] == refs
    assert sum(o.num_cached_tokens for o in outs) > 1000


def test_cuda_graphs_on_and_off_give_the_same_tokens():
    model = gpu_test_model(torch.bfloat16)
    prompts = _prompts()
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    tokens = []
    for eager in (False, True):
        llm = LLM.from_model(model, num_kv_blocks=2048, max_num_seqs=16, enforce_eager=eager)
        assert bool(llm.engine.runner.graphs) is not eager
        tokens.append([o.token_ids for o in llm.generate(prompts, params)])
        del llm
    assert tokens[0] == tokens[1]


def test_seeded_request_ignores_its_batch_mates():
    model = gpu_test_model(torch.float32)
    prompts = _prompts()
    llm = LLM.from_model(model, dtype="float32", num_kv_blocks=2048, max_num_seqs=16)
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate(prompts[3], seeded)[0].token_ids
    mates = SamplingParams(max_tokens=40, temperature=0.8, ignore_eos=True)
    crowd = llm.generate(prompts, [mates, mates, mates, seeded, mates, mates, mates, mates])
    assert crowd[3].token_ids == alone
