"""Start-up warm-up (engine/warmup.py) on CPU: every step shape it runs is valid, and it leaves no trace.

On CUDA the runner runs it before ``LLM()`` returns; here it runs through the torch paths on a tiny engine:
afterwards nothing is registered in the block manager, every block-table row is free again, and generation
gives the reference tokens (the fake sequences' K/V writes are never read by a real one).
"""

from __future__ import annotations

import torch

from llmray.engine.llm import LLM
from llmray.engine.sampling_params import SamplingParams
from llmray.engine.warmup import warmup
from llmray.model.generate import generate


def test_warmup_shapes_run_and_leave_no_trace(model):
    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (9, 30)]
    llm = LLM.from_model(model, kernels="torch", block_size=4, max_num_seqs=6, max_num_batched_tokens=40)
    runner, bm = llm.engine.runner, llm.engine.scheduler.block_manager
    free_rows = sorted(runner.inputs.rows.free)
    assert warmup(runner) > 0
    assert sorted(runner.inputs.rows.free)[: len(free_rows)] == free_rows
    assert len(runner.inputs.rows.free) == runner.inputs.rows.table.shape[0]  # every row released
    assert not runner.sampler.seq_generators and len(bm.free_empty) == bm.num_blocks
    outs = llm.generate(prompts, greedy)
    assert [o.token_ids for o in outs] == [generate(model, p, greedy.max_tokens) for p in prompts]
