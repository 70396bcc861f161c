"""The engine actor without Ray: several batches share one engine, and ``stats_dir`` gets its timeline."""

from __future__ import annotations

import asyncio
import json

import pyarrow as pa

from llmray.batch.processor import StreamingEngineActor


def test_streaming_actor_batches_and_stats(tiny_model_dir, tmp_path):
    actor = StreamingEngineActor(
        str(tiny_model_dir),
        dict(kernels="torch", max_model_len=64, max_num_seqs=4, device="cpu"),
        {},
        {"max_tokens": 3, "ignore_eos": True, "temperature": 0.0},
        False,
        1,
        None,
        stats_dir=str(tmp_path / "stats"),
    )
    batches = [
        pa.table({"id": [0, 1], "prompt": ["the cat", "a dog"]}),
        pa.table({"id": [2, 3], "prompt": ["", "tea"]}),  # an empty prompt is an error row
    ]

    async def run():
        async def one(batch):
            return [t async for t in actor(batch)]

        return await asyncio.gather(*(one(b) for b in batches))  # both batches in the engine at once

    tables = [t for ts in asyncio.run(run()) for t in ts]
    rows = [r for t in tables for r in t.to_pylist()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    assert [r["num_generated_tokens"] for r in rows] == [3, 3, 0, 3]
    assert rows[2]["error"] and not any(r["error"] for r in rows if r["id"] != 2)

    [path] = (tmp_path / "stats").glob("engine-*.json")
    st = json.loads(path.read_text())
    assert st["rows"] == 3 and st["output_tokens"] == 9
    assert st["actor_start"] <= st["engine_ready"] <= st["first_request"] <= st["last_finish"]
    assert 0 < st["engine_busy_s"] <= st["last_finish"] - st["first_request"] + 0.5
