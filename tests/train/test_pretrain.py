"""Pretraining on Ray Train (CPU workers, gloo): learns, survives a SIGKILLed worker on the same curve,
exports an HF model; the Triton kernels train like torch's in the worker's loop (Triton's interpreter).

One Ray Train run in all (Ray Train's start-up dominates on a 2-core machine). Fault test: 2 workers, FSDP2
(``--parallel fsdp``: sharded checkpoint gather, resume and export on Ray Train), Muon; at step 15, once
the step is logged, the rank-0 worker process kills itself with SIGKILL (no exception, no cleanup: as the
OOM killer would) and ``FailureConfig(max_failures=1)`` restarts the worker group from the step-8
checkpoint. The uninterrupted reference is the first attempt itself: it logged steps 1-15 without a break
(the kill hook keeps that log), and the resumed attempt must replay steps 9-15 bit for bit: the same loss,
gradient norm and learning rate (a wrong data position, lost optimizer state or schedule step changes
them). DDP and FSDP2 doing the same arithmetic is tests/train/test_fsdp.py's (2 spawned ranks, no Ray); a
raised exception instead of the kill goes through the same restart (tests/train/test_harness.py resumes
after one in-process).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _support.data import shared_data

from llmray.config import ModelConfig
from llmray.train import data as D
from llmray.train.cli import add_cli, config_from_args
from llmray.train.harness import resolve_precision
from llmray.train.loop import lr_multiplier, read_metrics
from llmray.train.pretrain import PretrainConfig, run_pretrain, train_steps
from llmray.train.session import LocalSession

STEPS, CKPT, KILL_AT = 16, 8, 15


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(shared_data("tinyshakespeare/input.txt").read_text()[:40_000])
    return path


def _cfg(corpus, out, **kw) -> PretrainConfig:
    base = dict(
        data=str(corpus),
        out=str(out),
        preset="tiny",
        tokenizer="char",
        max_steps=STEPS,
        num_workers=2,
        seq_len=32,
        batch_size=8,
        checkpoint_every=4,
        eval_every=8,
        eval_windows=32,
        warmup_steps=2,
        kernels="torch",
        cpus_per_worker=0.5,
    )
    base.update(kw)
    return PretrainConfig(**base)


@pytest.fixture(scope="module")
def resumed_run(ray_local, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = _cfg(corpus, out, checkpoint_every=CKPT, fail_at_step=KILL_AT, fail_kill=True, max_failures=1,
               parallel="fsdp")  # fmt: skip
    with pytest.MonkeyPatch.context() as env:  # Ray Train's controller polls its workers every 2 s by default
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        result = run_pretrain(cfg)
    return cfg, result


def test_worker_sigkill_resumes_on_the_uninterrupted_curve(resumed_run):
    cfg, result = resumed_run
    # the kill happened (once), after the first attempt had logged steps 1-15 uninterrupted
    first = [json.loads(line) for line in (Path(cfg.out) / ".injected_failure").read_text().splitlines()]
    assert [r["step"] for r in first] == list(range(1, KILL_AT + 1))
    records = read_metrics(result["metrics_file"])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # one curve, replayed steps replaced
    replayed = records[CKPT:KILL_AT]
    assert replayed != first[CKPT:KILL_AT]  # steps 9-15 were run again (their timings differ) ...
    for key in ("loss", "grad_norm", "lr"):  # ... and land exactly on the uninterrupted curve
        assert [r[key] for r in records[:KILL_AT]] == [r[key] for r in first], key
    state = json.loads((Path(result["checkpoint"]) / "trainer_state.json").read_text())["trainer"]
    assert state["step"] == STEPS and state["batches_consumed"] == STEPS
    # it learned: the last steps' loss is well below the first steps'
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0]
    assert (tmp := result["loss_curve"]) and open(tmp, "rb").read(4) == b"\x89PNG"


def test_output_dir_loads_in_transformers_with_equal_logits(resumed_run):
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from llmray.model.checkpoint import load_model

    cfg, result = resumed_run
    out = result["out"]
    hf = Qwen3ForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ours = load_model(out, kernels="torch")
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("First Citizen:\nBefore we")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    # the exported weights are the last checkpoint's (step 16), not the initial ones
    meta = json.loads(open(f"{result['checkpoint']}/trainer_state.json").read())
    assert meta["trainer"]["step"] == STEPS and meta["trainer"]["batches_consumed"] == STEPS


def test_schedules():
    assert lr_multiplier(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_multiplier(10, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(50, 100, 10, "wsd", 0.1) == 1.0
    assert lr_multiplier(90, 100, 10, "wsd", 0.0) == pytest.approx(0.5)


def test_cli_flags_and_config_validation(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(
        ["pretrain", "--data", "x.txt", "--out", str(tmp_path), "--preset", "tiny", "--optimizer", "adamw",
         "--max-steps", "7", "--num-workers", "2", "--use-gpu", "--tokenizer", "bpe", "--compile"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.optimizer, cfg.max_steps, cfg.num_workers, cfg.use_gpu, cfg.compile) == (
        "adamw",
        7,
        2,
        True,
        True,
    )
    args = parser.parse_args(["pretrain", "--data", "x", "--out", "y", "--parallel", "fsdp"])
    assert config_from_args(args).parallel == "fsdp"
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--data", "x", "--out", "y", "--parallel", "zero3"])
    with pytest.raises(ValueError, match="--optimizer must be muon or adamw"):
        dataclasses.replace(cfg, optimizer="sgd")
    with pytest.raises(ValueError, match="multiple of --grad-accum"):
        dataclasses.replace(cfg, batch_size=6, grad_accum=4)
    assert ModelConfig.preset("tiny").vocab_size == 512


def test_triton_kernels_train_like_torch_under_the_interpreter(ray_local, corpus, tmp_path):
    """``--kernels triton`` on CPU: Triton's interpreter (TRITON_INTERPRET=1) runs the kernels through the
    training loop (``train_steps``, the Ray Train worker's loop, here in-process) under bf16 autocast with fp32
    master weights, and the loss curve is the torch kernels' on the same rows. A Ray worker (a Ray Train
    worker too) inherits the interpreter from the driver's environment; the Ray Train path itself is the
    fault test's. Small shapes: the interpreter's time grows with the rows; every kernel branch runs at any size.
    """
    import ray

    from llmray.model.tokenizer import char_tokenizer

    assert os.environ.get("TRITON_INTERPRET") == "1"

    @ray.remote(num_cpus=0)
    def worker_env() -> str | None:
        return os.environ.get("TRITON_INTERPRET")

    assert ray.get(worker_env.remote()) == "1"
    assert (
        resolve_precision("auto", "cpu") == torch.float32
        and resolve_precision("bf16", "cpu") == torch.bfloat16
    )
    text = corpus.read_text()
    tok = char_tokenizer(text)
    train, val = D.split_tokens(np.asarray(tok.encode(text), dtype=np.int32), 0.1)
    mc = ModelConfig.preset("tiny").replace(
        vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, bos_token_id=None
    )
    curves = {}
    for kernels in ("triton", "torch"):
        cfg = _cfg(corpus, tmp_path / kernels, kernels=kernels, precision="bf16", num_workers=1, max_steps=2,
                   batch_size=2, seq_len=16, checkpoint_every=2, eval_every=2, eval_windows=2)  # fmt: skip
        batches = D.local_batches(train, cfg.seq_len, cfg.seed, cfg.batch_size)
        train_steps(cfg, mc, batches, val, LocalSession(root=tmp_path / f"ckpt_{kernels}"))
        curves[kernels] = read_metrics(tmp_path / kernels / "metrics.jsonl")
    assert [r["step"] for r in curves["triton"]] == [1, 2] and np.isfinite(curves["triton"][-1]["val_loss"])
    # bf16 autocast: the kernels round where torch's ops round differently (~1e-3 relative on the loss)
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(
            [r[key] for r in curves["triton"] if key in r],
            [r[key] for r in curves["torch"] if key in r],
            rtol=2e-2,
        )
