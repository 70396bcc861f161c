"""Multi-LoRA in the engine: a mixed batch equals each adapter alone and transformers+peft; one forward per
step whatever the adapter mix; adapters loaded and unloaded while requests run lose nothing."""

from __future__ import annotations

import pytest
import torch
from _support.lora import ALL_LINEAR, ATTN, make_peft_adapter

from llmray.engine.llm import LLM
from llmray.engine.sampling_params import SamplingParams
from llmray.lora.adapter import AdapterError
from llmray.model.checkpoint import load_model

peft = pytest.importorskip("peft")
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
ENGINE = dict(kernels="torch", block_size=4, max_loras=2, max_lora_rank=8)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    model = load_model(tiny_model_dir, kernels="torch").eval()
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model, root / "a", ATTN, r=4, alpha=8, seed=1)
    make_peft_adapter(model, root / "b", ALL_LINEAR, r=8, alpha=16, seed=2)
    make_peft_adapter(model, root / "c", ALL_LINEAR, r=2, alpha=2, seed=3)
    return {name: root / name for name in "abc"}


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(3, 300, (9,), generator=g).tolist()
    own = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 13, 2, 21)]
    return own + [shared + [4], shared + [5, 6]]


def hf_peft_greedy(model_dir, adapter_dir, prompt, n):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval() if adapter_dir else hf
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_mixed_batch_equals_each_adapter_alone_and_peft(tiny_model_dir, adapters, prompts):
    names = [None, "a", "b", "a", None, "b"]
    llm = LLM(tiny_model_dir, loras={k: adapters[k] for k in "ab"}, **ENGINE)
    launches, forwards = _count_forwards(llm)
    mixed = [o.token_ids for o in llm.generate(prompts, GREEDY, lora=names)]
    assert forwards[0] == launches[0] > 0  # one forward per step, whatever the adapter mix
    alone = [llm.generate([p], GREEDY, lora=n)[0].token_ids for p, n in zip(prompts, names, strict=True)]
    assert mixed == alone
    for i in (0, 1, 2):  # base, attention-only adapter, all-linear adapter against transformers + peft
        adapter = adapters[names[i]] if names[i] else None
        assert mixed[i] == hf_peft_greedy(tiny_model_dir, adapter, prompts[i], GREEDY.max_tokens)
    base = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert base[1] != mixed[1] and base[2] != mixed[2]  # the adapters do change the answers
    assert llm.stats()["num_free_blocks"] == llm.stats()["num_total_blocks"]
    assert sorted(llm.engine.lora.holds.values()) == [0, 0]


def _count_forwards(llm):
    runner, model = llm.engine.runner, llm.engine.runner.model
    launches, forwards = [0], [0]
    launch, hidden = runner.launch, model.hidden_states

    def counted_launch(*a, **k):
        launches[0] += 1
        return launch(*a, **k)

    def counted_hidden(*a, **k):
        forwards[0] += 1
        return hidden(*a, **k)

    runner.launch, model.hidden_states = counted_launch, counted_hidden
    return launches, forwards


def test_more_adapters_than_slots_wait_for_a_slot(tiny_model_dir, adapters, prompts):
    names = ["a", "b", "c", "a", "c", None]
    llm = LLM(tiny_model_dir, loras=adapters, **ENGINE)  # 3 adapters, 2 device slots
    got = [o.token_ids for o in llm.generate(prompts, GREEDY, lora=names)]
    roomy = LLM(tiny_model_dir, loras=adapters, **{**ENGINE, "max_loras": 3})
    assert got == [o.token_ids for o in roomy.generate(prompts, GREEDY, lora=names)]


def test_unload_and_reload_while_requests_run_lose_nothing(tiny_model_dir, adapters, prompts):
    ref = LLM(tiny_model_dir, loras=adapters, **ENGINE)
    expect = [o.token_ids for o in ref.generate(prompts, GREEDY, lora="a")]
    llm = LLM(tiny_model_dir, loras={"a": adapters["a"]}, max_num_seqs=2, **ENGINE)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY, "a")
    finals, steps = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.token_ids
        steps += 1
        if steps == 3:  # two running, four waiting: unload "a", then serve other weights under its name
            llm.remove_lora("a")
            with pytest.raises(ValueError, match="unknown LoRA adapter 'a'"):
                llm.generate(prompts[:1], GREEDY, lora="a")
            llm.add_lora("a", adapters["c"])
    assert [finals[f"r{i}"] for i in range(len(prompts))] == expect  # all ran on the version they got
    new = llm.generate(prompts[:2], GREEDY, lora="a")
    assert [o.token_ids for o in new] == [o.token_ids for o in ref.generate(prompts[:2], GREEDY, lora="c")]
    assert not engine.lora.retired and sum(engine.lora.holds.values()) == 0


def test_lora_errors(tiny_model_dir, adapters, tmp_path):
    plain = LLM(tiny_model_dir, kernels="torch")
    with pytest.raises(ValueError, match="without LoRA support"):
        plain.generate(["hi"], GREEDY, lora="a")
    llm = LLM(tiny_model_dir, loras={"a": adapters["a"]}, **ENGINE)
    with pytest.raises(ValueError, match="unknown LoRA adapter 'zzz'"):
        llm.generate(["hi"], GREEDY, lora="zzz")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        llm.add_lora("bad", tmp_path)
    assert llm.list_loras() == ["a"]
    with pytest.raises(KeyError):
        llm.remove_lora("bad")
    # the prefix cache keeps adapters apart: the same prompt under the base model then "a" hits nothing
    prompt = list(range(3, 30))
    llm.generate([prompt], GREEDY)
    assert llm.generate([prompt], GREEDY, lora="a")[0].num_cached_tokens == 0
    assert llm.generate([prompt], GREEDY, lora="a")[0].num_cached_tokens == 24


def test_async_add_and_remove(tiny_model_dir, adapters):
    import asyncio

    from llmray.engine.llm import AsyncLLM

    llm = AsyncLLM(tiny_model_dir, enable_lora=True, **ENGINE)

    async def go():
        await llm.add_lora("b", adapters["b"])
        outs = [o async for o in llm.generate_stream([5, 6, 7], GREEDY, lora="b")]
        with pytest.raises(AdapterError):
            await llm.add_lora("x", adapters["a"] / "missing")
        await llm.remove_lora("b")
        with pytest.raises(KeyError):
            await llm.remove_lora("b")
        return outs[-1].token_ids

    try:
        got = asyncio.run(go())
    finally:
        llm.shutdown()
    ref = LLM(tiny_model_dir, loras={"b": adapters["b"]}, **ENGINE)
    assert got == ref.generate([[5, 6, 7]], GREEDY, lora="b")[0].token_ids
    assert llm.list_loras() == []
