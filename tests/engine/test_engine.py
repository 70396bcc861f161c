"""Engine greedy outputs equal the reference ``generate``, under prefix hits, preemption and chunked prefill."""

from __future__ import annotations

import pytest
import torch

from llmray.engine.llm import LLM
from llmray.engine.sampling_params import SamplingParams
from llmray.model.generate import generate

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 512, (24,), generator=g).tolist()
    lens = (5, 17, 33, 1, 64)
    own = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lens]
    return own + [shared + [1, 2, 3], shared + [4, 5, 6, 7, 8, 9]]  # the last two share 24 tokens


@pytest.fixture(scope="module")
def refs(model, prompts):
    return [generate(model, p, GREEDY.max_tokens) for p in prompts]


def _check(llm, prompts, refs):
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == refs
    assert all(o.finish_reason == "length" for o in outs)
    return outs


def test_greedy_batch_matches_reference(model, prompts, refs):
    llm = LLM.from_model(model, kernels="torch", block_size=4)
    _check(llm, prompts, refs)
    assert llm.stats()["num_free_blocks"] == llm.stats()["num_total_blocks"]


def test_prefix_cache_hits_give_the_same_tokens(model, prompts, refs):
    llm = LLM.from_model(model, kernels="torch", block_size=4)
    _check(llm, prompts[:1], refs[:1])
    outs = _check(llm, prompts, refs)  # the first prompt is cached now; the last two share a prefix
    assert outs[0].num_cached_tokens == 4  # 5-token prompt: one full block, the last token recomputed
    # admitted in the same step, the two prompts sharing 24 tokens cannot hit each other yet; afterwards:
    llm2 = LLM.from_model(model, kernels="torch", block_size=4)
    _check(llm2, prompts[-2:-1], refs[-2:-1])
    assert _check(llm2, prompts[-1:], refs[-1:])[0].num_cached_tokens == 24
    again = _check(llm, prompts, refs)
    assert again[4].num_cached_tokens == 60  # 64-token prompt: 15 blocks of 4 served from the cache
    s = llm.stats()
    assert 0 < s["prefix_cache_hits"] <= s["prefix_cache_queries"]


def test_preemption_by_a_tiny_cache_gives_the_same_tokens(model, prompts, refs):
    llm = LLM.from_model(model, kernels="torch", block_size=4, num_kv_blocks=20, enable_prefix_caching=False)
    _check(llm, prompts, refs)
    assert llm.stats()["num_preemptions"] > 0


def test_chunked_prefill_by_a_tiny_budget_gives_the_same_tokens(model, prompts, refs):
    llm = LLM.from_model(model, kernels="torch", block_size=4, max_num_batched_tokens=7)
    _check(llm, prompts, refs)


def test_preemption_chunking_and_prefix_cache_together(model, prompts, refs):
    llm = LLM.from_model(model, kernels="torch", block_size=4, num_kv_blocks=24, max_num_batched_tokens=9)
    _check(llm, prompts, refs)
    _check(llm, prompts, refs)


def test_triton_kernels_in_the_engine_under_the_interpreter(model, prompts, refs):
    """The CUDA attention path (kv_store + paged decode/prefill kernels) run by Triton's CPU interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    from llmray.kernels.paged_attention import _decode_kernel

    if torch.cuda.is_available() or not isinstance(_decode_kernel, InterpretedFunction):
        pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (tests/engine/conftest.py does)")
    llm = LLM.from_model(model, kernels="torch", block_size=4, max_num_batched_tokens=24)
    llm.engine.runner.use_triton = True
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = llm.generate([prompts[1], prompts[6]], params)
    assert [o.token_ids for o in outs] == [refs[1][:4], refs[6][:4]]


def test_too_long_request_names_both_numbers(model):
    llm = LLM.from_model(model, kernels="torch", max_model_len=64)
    with pytest.raises(ValueError, match=r"60 tokens and max_tokens=10.*64"):
        llm.generate([list(range(60))], GREEDY)
    with pytest.raises(ValueError, match="unknown engine options"):
        LLM.from_model(model, kernels="torch", max_num_seq=3)
    with pytest.raises(ValueError, match="max_model_len 8192 is longer than the model's 1024 positions"):
        LLM.from_model(model, kernels="torch", max_model_len=8192)  # was silently cut to 1024
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)


def test_stop_token_ids_min_tokens_and_eos(model, prompts, refs):
    llm = LLM.from_model(model, kernels="torch")
    ref = refs[2]
    stop = ref[3]
    out = llm.generate(prompts[2], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop]))[0]
    first = ref.index(stop)
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop
    # min_tokens masks the stop token until reached: the output then differs from the greedy one there
    out = llm.generate(
        prompts[2],
        SamplingParams(max_tokens=10, min_tokens=first + 2, temperature=0.0, stop_token_ids=[stop]),
    )[0]
    assert stop not in out.token_ids[: first + 2]
    llm.engine.eos_token_id = ref[0]  # pretend the first greedy token is EOS
    out = llm.generate(prompts[2], SamplingParams(max_tokens=10, temperature=0.0))[0]
    assert out.token_ids == ref[:1] and out.finish_reason == "stop"
    out = llm.generate(prompts[2], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    assert out.token_ids == ref


def test_logprobs_top_n(model, prompts):
    llm = LLM.from_model(model, kernels="torch")
    out = llm.generate(prompts[0], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2))[0]
    assert len(out.logprobs) == 3
    with torch.no_grad():
        full = model(torch.tensor([prompts[0]]))[0, -1].log_softmax(-1)
    first = out.logprobs[0]
    top = full.topk(2)
    assert set(first) == set(top.indices.tolist())  # greedy: the chosen token is the top-1
    for tok, lp in first.items():
        assert abs(lp - float(full[tok])) < 1e-4


def test_seeded_sampling_is_reproducible_whatever_the_batch(model, prompts):
    llm = LLM.from_model(model, kernels="torch")
    p = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=123, ignore_eos=True)
    alone = llm.generate(prompts[1], p)[0].token_ids
    other = SamplingParams(max_tokens=8, temperature=0.7, ignore_eos=True)
    crowd = llm.generate([prompts[0], prompts[1], prompts[3]], [other, p, other])[1].token_ids
    assert alone == crowd
    different = llm.generate(
        prompts[1], SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    )
    assert different[0].token_ids != alone


def test_top_k_one_is_greedy_and_penalties_change_output(model, prompts, refs):
    llm = LLM.from_model(model, kernels="torch")
    out = llm.generate(prompts[2], SamplingParams(max_tokens=10, temperature=0.8, top_k=1, ignore_eos=True))
    assert out[0].token_ids == refs[2]
    rep = SamplingParams(max_tokens=10, temperature=0.0, frequency_penalty=2.0, ignore_eos=True)
    toks = llm.generate(prompts[2], rep)[0].token_ids
    assert max(toks.count(t) for t in toks) <= max(refs[2].count(t) for t in refs[2])


def test_text_and_stop_strings_with_a_tokenizer(tiny_model_dir):
    llm = LLM(tiny_model_dir, kernels="torch")
    tok = llm.tokenizer
    full = llm.generate("the model", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert full.text == tok.decode(full.token_ids)
    if len(full.text) > 4:
        stop = full.text[2:4]
        out = llm.generate("the model", SamplingParams(max_tokens=12, temperature=0.0, stop=[stop]))[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == full.text[: full.text.index(stop)]


def test_sync_and_async_scheduling_agree(model, prompts, refs):
    """Overlapped scheduling (placeholder tokens, speculative steps discarded) changes nothing observable."""
    params = [
        SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[refs[i][4]]) if i % 2 else GREEDY
        for i in range(len(prompts))
    ]
    results = []
    for overlap in (False, True):
        llm = LLM.from_model(model, kernels="torch", block_size=4, num_kv_blocks=24, max_num_batched_tokens=9)
        llm.engine.async_scheduling = overlap
        results.append([(o.token_ids, o.finish_reason) for o in llm.generate(prompts, params)])
        assert llm.stats()["num_free_blocks"] == 24
    assert results[0] == results[1]
    for i, (toks, reason) in enumerate(results[1]):
        stop = refs[i].index(refs[i][4]) + 1 if i % 2 else 10
        assert toks == refs[i][:stop] and reason == ("stop" if i % 2 else "length")
