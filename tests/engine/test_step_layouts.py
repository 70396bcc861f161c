"""Padded step layouts (what CUDA graphs replay) run eagerly on CPU: the same tokens as the reference.

The graph path's inputs — decode kernel over every sequence slot, prefill over a padded tile list, padding
tokens at slot -1, placeholders resolved on the device — run here through the Triton interpreter, with the
graphs' padding but without capture, on decode-only steps, mixed steps and prefix-cache hits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmray.engine.attention_metadata import PagedAttentionMetadata
from llmray.engine.cuda_graphs import CudaGraphs, mixed_buckets
from llmray.engine.llm import LLM
from llmray.engine.sampling_params import SamplingParams
from llmray.engine.step_inputs import Layout, tile_capacity
from llmray.kernels.qk_norm_rope import qk_norm_rope
from llmray.model.generate import generate

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def test_layout_sizes_and_buckets():
    assert Layout(16, 8, 3).sizes() == [16] * 5 + [9, 8, 3, 3]
    assert tile_capacity(64, 32, 64) == 1 + 32 + 1
    assert mixed_buckets(512, 8192) == [16, 32, 64, 128, 256, 512]
    assert mixed_buckets(100, 48) == [16, 32]
    assert mixed_buckets(8192, 8192)[-3:] == [2048, 4096, 8192]  # full-budget steps can replay graphs too


def test_graph_layouts_run_eagerly_match_the_reference(model):
    from triton.runtime.interpreter import InterpretedFunction

    from llmray.kernels.paged_attention import _decode_kernel

    if torch.cuda.is_available() or not isinstance(_decode_kernel, InterpretedFunction):
        pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (tests/engine/conftest.py does)")
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, 512, (13,), generator=g).tolist()
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 21, 1)]
    prompts += [shared + [7], shared + [8, 9]]  # the second hits the prefix cache (3 blocks of 4)
    refs = [generate(model, p, GREEDY.max_tokens) for p in prompts]
    llm = LLM.from_model(
        model, kernels="torch", block_size=4, max_num_seqs=4, max_num_batched_tokens=24, max_graph_tokens=16
    )
    r = llm.engine.runner
    r.use_triton = True
    r._splits = lambda rows: 1  # (split-K decode + merge under the interpreter: test_engine.py's kernel test)
    r.prefill_splits = (
        2  # small steps' split-K prefill + merge (2: fewer interpreted programs than the GPU's 8)
    )
    graphs = CudaGraphs(r._forward, r.inputs.dev, 4, r.max_blocks_per_seq, 16, 24, r.block_m, False, 16)
    r._cuda_graphs = graphs
    used = []
    pick = graphs.pick
    graphs.pick = lambda *a: used.append(pick(*a)) or used[-1]
    # the fused q/k norm + rope kernel, so the model takes the norm_rope_store hook: k/v reach the cache
    # from that kernel (the other ops stay torch: interpreter time)
    model._ops = dataclasses.replace(model.ops, qk_norm_rope=qk_norm_rope)
    stores = []
    hook = PagedAttentionMetadata._norm_rope_store
    PagedAttentionMetadata._norm_rope_store = lambda self, *a: stores.append(1) or hook(self, *a)  # type: ignore
    try:
        # the one-token prompt stops early: the last prompt joins running decodes (a mixed step)
        params = (
            [GREEDY] * 2 + [SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)] + [GREEDY] * 2
        )
        outs = llm.generate(prompts, params)
        alone = llm.generate([shared + [9, 9]], GREEDY)[0]  # a prefix hit alone: a prefill graph
    finally:
        PagedAttentionMetadata._norm_rope_store = hook  # type: ignore
        model.set_kernels("torch")
    assert stores and r.fuse_kv_store
    refs[2] = refs[2][:2]
    assert [o.token_ids for o in outs] == refs
    assert (
        alone.token_ids == generate(model, shared + [9, 9], GREEDY.max_tokens)
        and alone.num_cached_tokens == 12
    )
    kinds = {u[0] for u in used if u is not None}
    assert kinds == {"decode", "mixed", "prefill"} and None in used  # every graph kind and eager steps ran
    assert outs[4].num_cached_tokens == 12
