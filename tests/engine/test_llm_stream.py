"""``LLM.generate_stream``: the same tokens as ``generate``, yielded as each request finishes, fed lazily."""

from __future__ import annotations

import pytest
import torch

from llmray.engine.llm import LLM
from llmray.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm():
    from llmray.config import ModelConfig
    from llmray.model.qwen3 import Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="torch").eval()
    return LLM.from_model(model, kernels="torch", block_size=4, max_num_seqs=4)


def _requests():
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(12):
        prompt = torch.randint(0, 512, (3 + 5 * i % 17,), generator=g).tolist()
        params = SamplingParams(max_tokens=2 + (7 * i) % 11, temperature=0.0, ignore_eos=True)
        out.append((f"row-{i}", prompt, params))
    return out


def test_stream_matches_generate_and_feeds_lazily(llm):
    reqs = _requests()
    ref = llm.generate([p for _, p, _ in reqs], [s for _, _, s in reqs])
    pulled = []

    def source():
        for r in reqs:
            pulled.append(r[0])
            yield r

    got, pulled_at_first, peak = {}, None, 0
    for out in llm.generate_stream(source(), max_in_flight=3):
        peak = max(peak, len(llm.engine.requests) + 1)
        if pulled_at_first is None:
            pulled_at_first = len(pulled)
        assert out.finished and out.request_id not in got
        got[out.request_id] = out
    assert set(got) == {r[0] for r in reqs}
    for (rid, _, params), r in zip(reqs, ref, strict=True):
        assert got[rid].token_ids == r.token_ids
        assert len(got[rid].token_ids) == params.max_tokens
    assert pulled_at_first <= 3  # the first result came before the rest of the input was read
    assert peak <= 3  # never more than max_in_flight requests in the engine
    order = list(got)
    assert order != [r[0] for r in reqs]  # completion order: short requests overtake long ones
    assert not llm.engine.has_unfinished()


def test_stream_defaults_early_close_and_bad_request(llm):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = list(llm.generate_stream([("a", [1, 2, 3]), ("b", [4, 5], None, None)], params))
    assert sorted(o.request_id for o in outs) == ["a", "b"]
    assert all(len(o.token_ids) == 4 for o in outs)
    long = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    stream = llm.generate_stream(((str(i), [i + 1] * 3, long) for i in range(10)), max_in_flight=4)
    next(stream)
    stream.close()  # the requests still running are aborted
    assert not llm.engine.requests
    with pytest.raises(ValueError, match="empty"):
        list(llm.generate_stream([("bad", [])], params))
    assert not llm.engine.requests
    assert [o.request_id for o in llm.generate_stream([("ok", [7, 8])], params)] == ["ok"]


def test_live_feed_yields_none_while_waiting(llm):
    """A feed yielding None (nothing new yet) keeps the running requests stepping."""
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    seen = []

    def feed():
        yield ("first", [1, 2, 3])
        for _ in range(5):
            yield None  # e.g. an empty queue while "first" runs
        yield ("second", [4, 5, 6])

    for out in llm.generate_stream(feed(), params):
        seen.append(out.request_id)
    assert sorted(seen) == ["first", "second"]
    ref = llm.generate([[1, 2, 3], [4, 5, 6]], params)
    assert seen and all(len(r.token_ids) == 3 for r in ref)
