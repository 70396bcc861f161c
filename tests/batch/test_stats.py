"""The engine actor without Ray: several batches share one engine, ``stats_dir`` gets its timeline, and rows
prepared by the ``prepare_batch`` stage give the same tokens and errors as rows tokenized in the actor."""

from __future__ import annotations

import asyncio
import json

import pyarrow as pa
import pytest

from llmray.batch.prepare import PREP_COLUMNS, prepare_batch
from llmray.batch.processor import StreamingEngineActor

DEFAULTS = {"max_tokens": 3, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def actor(tiny_model_dir, tmp_path_factory):
    stats = tmp_path_factory.mktemp("stats")
    engine = dict(kernels="torch", max_model_len=64, max_num_seqs=4, device="cpu")
    a = StreamingEngineActor(str(tiny_model_dir), engine, {}, DEFAULTS, True, 1, None, stats_dir=str(stats))
    a.stats_dir = stats
    return a


def _run(actor, batches):
    async def run():
        async def one(batch):
            return [t async for t in actor(batch)]

        return await asyncio.gather(*(one(b) for b in batches))  # all batches in the engine at once

    return [r for ts in asyncio.run(run()) for t in ts for r in t.to_pylist()]


def test_streaming_actor_batches_and_stats(actor):
    [path] = actor.stats_dir.glob("engine-*.json")  # written once the engine is up
    assert json.loads(path.read_text())["rows"] == 0
    batches = [
        pa.table({"id": [0, 1], "prompt": ["the cat", "a dog"]}),
        pa.table({"id": [2, 3], "prompt": ["", "tea"]}),  # an empty prompt is an error row
    ]
    rows = _run(actor, batches)
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    assert [r["num_generated_tokens"] for r in rows] == [3, 3, 0, 3]
    assert rows[2]["error"] and not any(r["error"] for r in rows if r["id"] != 2)

    st = json.loads(path.read_text())
    assert st["rows"] == 3 and st["output_tokens"] == 9
    assert st["actor_start"] <= st["engine_ready"] <= st["first_request"] <= st["last_finish"]
    assert 0 < st["engine_busy_s"] <= st["last_finish"] - st["first_request"] + 0.5


def test_prepared_rows_match_rows_tokenized_in_the_actor(actor, tiny_model_dir):
    lines = [
        {"prompt": "the quick brown fox"},
        {"messages": [{"role": "user", "content": "hello there"}]},
        {"prompt_token_ids": [5, 6, 7, 8]},
        {"prompt": "x", "sampling_params": {"max_tokens": 2, "temperature": None}},
        {"prompt": "the", "sampling_params": {"max_tokens": 12, "stop": ["e", "t"]}},  # detokenized per step
        {"prompt": ""},  # empty: the actor's check
        {"prompt_token_ids": [10**6]},  # outside the vocabulary: the actor's check
        {"prompt": "x", "sampling_params": {"max_tokens": 0}},  # the preparer's check
        {"prompt": "x", "lora": "zzz"},  # no adapters here
        {"prompt": "a", "messages": []},  # two prompts
    ]
    texts = [json.dumps(row) for row in lines] + ["{not json", "[1, 2]"]
    batch = pa.table({"line": list(range(len(texts))), "_json": texts})
    prepared = prepare_batch(batch, model_dir=str(tiny_model_dir), defaults=DEFAULTS, json_column="_json")
    assert set(PREP_COLUMNS) <= set(prepared.column_names)
    actor.json_column = "_json"
    try:
        direct, staged = _run(actor, [batch]), _run(actor, [prepared])
    finally:
        actor.json_column = None
    assert [r["generated_token_ids"] for r in staged] == [r["generated_token_ids"] for r in direct]
    assert [r["error"] for r in staged] == [r["error"] for r in direct]
    assert [r["num_generated_tokens"] for r in staged][:4] == [3, 3, 3, 2]
    assert [r["num_generated_tokens"] for r in staged][5:] == [0] * 7
    errors = [r["error"] or "" for r in staged]
    for i, words in [(5, "empty"), (6, "vocabulary"), (7, "max_tokens"), (8, "zzz"), (9, "exactly one")]:
        assert words in errors[i], (i, errors[i])
    assert "not valid JSON" in errors[10] and "JSON object" in errors[11]
    # texts decoded once a row is done (stop-string rows step by step) are LLM.generate's
    from llmray.engine.llm import LLM
    from llmray.engine.sampling_params import SamplingParams

    llm = LLM(str(tiny_model_dir), kernels="torch", max_model_len=64, device="cpu")
    good = lines[:5]
    prompts = [
        r.get("prompt") or r.get("prompt_token_ids") or llm.tokenizer.apply_chat_template(r["messages"])
        for r in good
    ]
    params = [
        SamplingParams(
            **{**DEFAULTS, **{k: v for k, v in r.get("sampling_params", {}).items() if v is not None}}
        )
        for r in good
    ]
    want = llm.generate(prompts, params)
    assert [r["generated_text"] for r in staged[:5]] == [o.text for o in want]
    assert [r["generated_token_ids"] for r in staged[:5]] == [o.token_ids for o in want]
    assert want[4].finish_reason == "stop" or want[4].text.count("e") + want[4].text.count("t") == 0
    assert not set(PREP_COLUMNS) & set(staged[0]) and staged[0]["line"] == 0
