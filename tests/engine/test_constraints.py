"""Constrained decoding hook (TokenConstraint + device bitmask) and per-request failure isolation."""

from __future__ import annotations

import pytest
import torch

from llmray.engine.llm import LLM
from llmray.engine.sampling_params import SamplingParams
from llmray.engine.sequence import TokenConstraint
from llmray.model.generate import generate

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


class EvenOnly:
    """Only even token ids."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0x55555555  # bits 0, 2, 4, ... of every word

    def accept_token(self, token_id: int) -> bool:
        self.seen.append(token_id)
        return token_id % 2 == 0

    def is_terminated(self) -> bool:
        return False


class Exactly:
    """Exactly these tokens, then the grammar is complete."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.pos = tokens, 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        t = self.tokens[self.pos]
        bitmask[row, t // 32] = torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)

    def accept_token(self, token_id: int) -> bool:
        ok = token_id == self.tokens[self.pos]
        self.pos += 1
        return ok

    def is_terminated(self) -> bool:
        return self.pos == len(self.tokens)


class BrokenFill(EvenOnly):
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        raise RuntimeError("grammar compiler crashed")


class RejectsAll(EvenOnly):
    def accept_token(self, token_id: int) -> bool:
        return False


class BadParams(SamplingParams):
    """Sampling state that breaks the sampler (only this request's)."""

    armed = False

    @property
    def top_k(self):  # read by the sampler for non-greedy rows
        if self.armed:
            raise RuntimeError("corrupt sampling state")
        return 0

    @top_k.setter
    def top_k(self, value):
        pass


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 9)]


def _run(model, prompts, params, constraints, overlap=True):
    llm = LLM.from_model(model, kernels="torch", block_size=4, max_num_batched_tokens=16)
    llm.engine.async_scheduling = overlap
    engine = llm.engine
    for i, (p, sp, c) in enumerate(zip(prompts, params, constraints, strict=True)):
        engine.add_request(f"r{i}", p, sp)
        engine.requests[f"r{i}"].seq.constraint = c
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert llm.stats()["num_free_blocks"] == llm.stats()["num_total_blocks"]
    return [final[f"r{i}"] for i in range(len(prompts))], engine


def test_the_protocol_is_runtime_checkable():
    assert isinstance(EvenOnly(), TokenConstraint) and isinstance(Exactly([1]), TokenConstraint)


@pytest.mark.parametrize("overlap", [True, False])
def test_constrained_rows_follow_their_mask_and_free_rows_are_untouched(model, prompts, overlap):
    ref = generate(model, prompts[2], GREEDY.max_tokens)
    sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    even, exact = EvenOnly(), Exactly([7, 300, 11])
    outs, _ = _run(model, prompts, [sampled, GREEDY, GREEDY], [even, exact, None], overlap)
    assert len(outs[0].token_ids) == 8 and all(t % 2 == 0 for t in outs[0].token_ids)
    assert even.seen == outs[0].token_ids  # every token was accepted, in order
    assert outs[1].token_ids == [7, 300, 11] and outs[1].finish_reason == "stop"
    assert outs[2].token_ids == ref and outs[2].finish_reason == "length"


@pytest.mark.parametrize("broken", [BrokenFill, RejectsAll])
def test_a_broken_constraint_fails_only_its_request(model, prompts, broken):
    refs = [generate(model, p, GREEDY.max_tokens) for p in prompts[1:]]
    outs, engine = _run(model, prompts, [GREEDY] * 3, [broken(), None, None])
    assert outs[0].finish_reason == "error" and "constraint" in outs[0].stop_reason
    assert [o.token_ids for o in outs[1:]] == refs
    assert [rid for rid, _ in engine.pop_failed()] == ["r0"]


def test_a_request_whose_sampling_state_breaks_fails_alone(model, prompts):
    refs = [generate(model, p, GREEDY.max_tokens) for p in prompts[:2]]
    bad = BadParams(max_tokens=8, temperature=0.7, ignore_eos=True)
    bad.armed = True
    outs, _ = _run(model, prompts, [GREEDY, GREEDY, bad], [None, None, None])
    assert outs[2].finish_reason == "error" and "sampling failed" in outs[2].stop_reason
    assert [o.token_ids for o in outs[:2]] == refs
