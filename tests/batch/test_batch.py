"""Batch inference on Ray Data: the processor gives ``LLM.generate``'s greedy tokens (adapters: peft's), bad
rows carry errors, and ``llmray batch`` killed mid-run and rerun writes every row exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _support.lora import ATTN, make_peft_adapter

from llmray.engine.llm import LLM
from llmray.engine.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[2]
ENGINE = dict(kernels="torch", max_model_len=256)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    from llmray.model.checkpoint import load_model

    model = load_model(tiny_model_dir, kernels="torch").eval()
    path = tmp_path_factory.mktemp("adapter") / "a"
    make_peft_adapter(model, path, ATTN, r=4, alpha=8, seed=1)
    return path


@pytest.fixture(scope="module")
def ref_llm(tiny_model_dir, adapter):
    return LLM(tiny_model_dir, loras={"a": adapter}, max_lora_rank=16, **ENGINE)


def _reference(llm, rows):
    """Greedy tokens of ``LLM.generate`` for rows of the batch format."""
    prompts, params, loras = [], [], []
    for r in rows:
        if "messages" in r:
            prompts.append(llm.tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True))
        else:
            prompts.append(r.get("prompt") or r.get("prompt_token_ids"))
        params.append(SamplingParams(**r["sampling_params"]))
        loras.append(r.get("lora"))
    return [o.token_ids for o in llm.generate(prompts, params, lora=loras)]


def _rows(n):
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(n):
        sp = {"max_tokens": 2 + i % 9, "temperature": 0.0, "ignore_eos": True}
        row = {"id": f"r{i}", "sampling_params": sp}
        if i % 4 == 0:
            row["messages"] = [{"role": "user", "content": f"tell me about {i}"}]
        elif i % 4 == 2:
            row["prompt_token_ids"] = torch.randint(3, 300, (1 + i % 23,), generator=g).tolist()
        else:
            row["prompt"] = f"row {i}: " + "the quick brown fox " * (i % 5)
        if i % 10 == 3:
            row["lora"] = "a"
        rows.append(row)
    return rows


BAD = {
    "empty": ({"prompt": ""}, "empty"),
    "too-long": ({"prompt_token_ids": [5] * 300}, "context window"),
    "out-of-vocab": ({"prompt_token_ids": [10**6]}, "outside the vocabulary"),
    "unknown-adapter": ({"prompt": "x", "lora": "zzz"}, "unknown LoRA adapter"),
    "bad-param": ({"prompt": "x", "sampling_params": {"max_tokens": 0}}, "max_tokens"),
    "no-prompt": ({}, "exactly one of"),
}


def test_processor_200_rows_two_actors_match_generate_and_peft(ray_local, tiny_model_dir, adapter, ref_llm):
    from llmray.batch import build_processor

    rows = _rows(200)
    bad = [{"id": k, **({"sampling_params": {"max_tokens": 4}} | row)} for k, (row, _) in BAD.items()]
    processor = build_processor(
        tiny_model_dir,
        concurrency=2,
        batch_size=16,
        engine_kwargs=ENGINE,
        lora={"a": adapter},
        include_token_ids=True,
        postprocess=lambda r: {**r, "n": r["num_generated_tokens"]},
    )
    # 4 blocks: Ray Data's default here is 16 (2 x the 8 logical CPUs), a preprocessing task each, and every task
    # running at once is a new Ray worker process (~3 CPU-s on two cores); 4 still feed both engines
    out = processor(ray_local.data.from_items(rows + bad, override_num_blocks=4)).take_all()
    by_id = {r["id"]: r for r in out}
    assert len(out) == len(by_id) == len(rows) + len(bad)  # every id exactly once
    want = _reference(ref_llm, rows)
    for row, tokens in zip(rows, want, strict=True):
        got = by_id[row["id"]]
        assert got["error"] is None and got["finish_reason"] == "length"
        assert list(got["generated_token_ids"]) == tokens, row["id"]
        assert got["n"] == len(tokens) == row["sampling_params"]["max_tokens"]
    for name, (_, message) in BAD.items():
        assert message in by_id[name]["error"], (name, by_id[name]["error"])
        assert by_id[name]["generated_text"] is None
    # an adapter row against transformers + peft
    from transformers import AutoModelForCausalLM

    peft = pytest.importorskip("peft")
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
    row = next(r for r in rows if r.get("lora") == "a" and r["sampling_params"]["max_tokens"] >= 5)
    ids = torch.tensor([ref_llm.tokenizer.encode(row["prompt"])])
    with torch.no_grad():
        n = row["sampling_params"]["max_tokens"]
        ref = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert list(by_id[row["id"]]["generated_token_ids"]) == ref[0, ids.shape[1] :].tolist()


def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def _read_outputs(out_dir, fmt="jsonl"):
    rows = []
    for p in sorted(Path(out_dir).glob(f"*.{fmt}")):
        if fmt == "jsonl":
            rows += [json.loads(line) for line in p.read_text().splitlines()]
        else:
            import pyarrow.parquet as pq

            rows += pq.read_table(p).to_pylist()
    return rows


def test_cli_killed_mid_run_resumes_without_loss_or_duplicates(ray_local, tiny_model_dir, ref_llm, tmp_path):
    from llmray.batch.cli import run_batch

    rows = [r for r in _rows(40) if "lora" not in r]
    for r in rows:
        r["sampling_params"]["max_tokens"] = 8
    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    _write_jsonl(src, rows, extra_lines=["", "{broken json"])
    # batches of one shard, two sequences at a time: shards finish one after another, so the kill lands mid-run
    flags = ["--shard-rows", "10", "--batch-size", "10", "--max-num-seqs", "2", "--max-model-len", "256"]
    flags.append("--token-ids")
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "jobs" / "batch.py"), "--model", str(tiny_model_dir)]
    proc = subprocess.Popen(
        [*cmd, "--input", str(src), "--output", str(out), "--no-progress", *flags],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not list(out.glob("*.jsonl")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a crash: no cleanup, shards in progress are lost
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.jsonl")}
    n_lines = len(rows) + 2
    n_shards = -(-n_lines // 10)
    assert 1 <= len(first) < n_shards, first  # killed part-way

    summary = run_batch(
        str(tiny_model_dir),
        str(src),
        str(out),
        engine_kwargs={"max_num_seqs": 2, "max_model_len": 256},
        batch_size=10,
        shard_rows=10,
        include_token_ids=True,
        progress=False,
    )
    assert summary["skipped"] == len(first) and summary["written"] == n_shards - len(first)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.jsonl") if p.name in first} == first
    got = _read_outputs(out)
    lines = sorted(r["input_line"] for r in got)
    assert lines == [*range(1, n_lines - 1), n_lines]  # every row once (a blank line is none), in place
    by_id = {r["id"]: r for r in got if "id" in r}
    for row, tokens in zip(rows, _reference(ref_llm, rows), strict=True):
        assert by_id[row["id"]]["generated_token_ids"] == tokens
    assert "not valid JSON" in next(r for r in got if r["input_line"] == n_lines)["error"]
    again = run_batch(str(tiny_model_dir), str(src), str(out), shard_rows=10, progress=False)
    assert again["written"] == 0 and again["skipped"] == n_shards  # nothing left to do
    with pytest.raises(ValueError, match="other inputs or settings"):
        run_batch(str(tiny_model_dir), str(src), str(out), shard_rows=7, progress=False)


def test_parquet_in_and_out_synchronous_actor(ray_local, tiny_model_dir, ref_llm, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmray.batch.cli import run_batch

    rows = [{"id": i, "prompt": f"parquet row {i}"} for i in range(24)]
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src, row_group_size=7)
    summary = run_batch(
        str(tiny_model_dir),
        str(src),
        str(tmp_path / "out"),
        sampling_params={"max_tokens": 5, "temperature": 0, "ignore_eos": True},
        engine_kwargs={"max_model_len": 256},
        shard_rows=10,
        include_token_ids=True,
        streaming=False,
        progress=False,
    )
    assert summary["written"] == 3 and summary["rows"] == 24 and summary["errors"] == 0
    got = sorted(_read_outputs(tmp_path / "out", "parquet"), key=lambda r: r["id"])
    assert [r["input_line"] for r in got] == list(range(1, 25))
    for r in rows:
        r["sampling_params"] = {"max_tokens": 5, "temperature": 0.0, "ignore_eos": True}
    assert [r["generated_token_ids"] for r in got] == _reference(ref_llm, rows)
