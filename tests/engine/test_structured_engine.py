"""Structured outputs through the engine: SamplingParams.structured_output on a random-weight model gives
documents that validate (the grammar, not the weights, guarantees it); free requests in the same batch get
the tokens they get alone; a schema that cannot be compiled is refused at add_request."""

from __future__ import annotations

import json

import jsonschema
import pytest

from llmray.engine.errors import RequestError
from llmray.engine.llm import LLM
from llmray.engine.sampling_params import SamplingParams
from llmray.engine.structured import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "kind": {"enum": ["cat", "dog"]},
        "scores": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    },
    "required": ["name", "kind", "scores", "meta"],
}


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(
        tiny_model_dir, kernels="torch", enable_prefix_caching=False
    )  # alone vs mixed: one prefill path


def test_schema_outputs_validate(llm):
    params = [
        SamplingParams(max_tokens=300, temperature=1.0, seed=s, structured_output={"json": SCHEMA})
        for s in range(4)
    ]
    outs = llm.generate(["Describe a pet as JSON:"] * 4, params)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_json_object_regex_and_choice(llm):
    outs = llm.generate(
        ["a", "b", "c"],
        [
            SamplingParams(max_tokens=200, seed=1, structured_output=StructuredOutput(json_object=True)),
            SamplingParams(max_tokens=50, seed=2, structured_output={"regex": r"[0-9]{3}-[a-z]{2}"}),
            SamplingParams(max_tokens=50, seed=3, structured_output={"choice": ["yes", "no"]}),
        ],
    )
    # any JSON object: its strings are unbounded, so a random-weight model may reach max_tokens (it did on an
    # H200, where the weights and so the samples differ from the CPU's); what finished "stop" must parse
    assert outs[0].finish_reason in ("stop", "length") and outs[0].text.lstrip().startswith("{")
    if outs[0].finish_reason == "stop":
        assert isinstance(json.loads(outs[0].text), dict)
    assert len(outs[1].text) == 6 and outs[1].text[:3].isdigit() and outs[1].text[3] == "-"
    assert outs[2].text in ("yes", "no")


def test_free_requests_get_the_same_tokens_beside_constrained_ones(llm):
    free = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=12, seed=7),
    ]
    alone = llm.generate(["hello there", "the engine"], free)
    constrained = SamplingParams(max_tokens=200, seed=1, structured_output={"json": SCHEMA})
    mixed = llm.generate(
        ["x", "hello there", "y", "the engine"], [constrained, free[0], constrained, free[1]]
    )
    assert [o.token_ids for o in (mixed[1], mixed[3])] == [o.token_ids for o in alone]
    jsonschema.validate(json.loads(mixed[0].text), SCHEMA)


def test_bad_schema_is_refused_naming_the_problem(llm):
    bad = SamplingParams(structured_output={"json": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}})
    with pytest.raises(RequestError, match="structured_output.json") as e:
        llm.engine.add_request("bad", "hi", bad)
    assert e.value.param == "structured_output" and "bad" not in llm.engine.requests
    with pytest.raises(RequestError, match="exactly one"):
        SamplingParams(structured_output={})


def test_deferred_sampling_gives_the_tokens_of_synchronous_steps(llm):
    """Launching the next forward ahead and sampling it after read-back (the default) changes no token."""
    prompts = ["x", "hello there", "y", "the engine", "z"]
    params = [
        SamplingParams(max_tokens=60, seed=1, structured_output={"json": SCHEMA}),
        SamplingParams(max_tokens=20, seed=7),
        SamplingParams(max_tokens=30, seed=2, structured_output={"choice": ["yes", "no", "maybe"]}),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=40, seed=3, structured_output={"regex": r"[a-z]{3,9}( [a-z]{2,5}){2}"}),
    ]
    engine, masks = llm.engine, llm.engine.runner.masks
    assert engine.defer_constrained_sampling and engine.async_scheduling and masks.early
    started = masks.started
    deferred = llm.generate(prompts, params)
    assert masks.started > started  # masks filled on the worker once the previous step's tokens landed
    engine.defer_constrained_sampling = False
    try:
        synchronous = llm.generate(prompts, params)
    finally:
        engine.defer_constrained_sampling = True
    masks.from_event = False  # the fill started after the host's read-back, not when the tokens land
    try:
        after_read_back = llm.generate(prompts, params)
    finally:
        masks.from_event = True
    masks.early = False  # deferred, filled at sampling time
    try:
        late = llm.generate(prompts, params)
    finally:
        masks.early = True
    others = [synchronous, after_read_back, late]
    if masks.is_cuda:  # the device (not the host) waits for the worker: a host flag, a device flag; the host
        # (host flag: stored after the worker's checks, its poll and copy queued at sampling: the older orders)
        default = (masks.device_wait, masks.host_flag, masks.early_signal, masks.copy_at_start)
        try:
            for mode in ((True, True), (True, False), (False, True)):
                masks.device_wait, masks.host_flag = mode
                others.append(llm.generate(prompts, params))
            masks.device_wait, masks.host_flag, masks.early_signal, masks.copy_at_start = (
                True,
                True,
                False,
                False,
            )
            others.append(llm.generate(prompts, params))
        finally:
            masks.device_wait, masks.host_flag, masks.early_signal, masks.copy_at_start = default
    for other in others:
        assert [o.token_ids for o in deferred] == [o.token_ids for o in other]
        assert [o.finish_reason for o in deferred] == [o.finish_reason for o in other]
