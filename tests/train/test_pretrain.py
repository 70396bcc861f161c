"""Pretraining on Ray Train (2 CPU workers, gloo): learns, resumes on the same curve, exports an HF model.

One Ray Train run does it all (Ray start-up dominates on a 2-core machine): 2 workers, a failure injected
at step 10, ``FailureConfig(max_failures=1)`` restarts the worker group from the step-8 checkpoint. The
uninterrupted reference is ``train_steps`` in this process with one worker and twice the batch: with
``preserve_order`` the split hands worker 0 rows [0, B), worker 1 rows [B, 2B), ... so each DDP step sees
exactly the rows of one reference step, and averaged gradients equal the full-batch gradient.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from _support.data import shared_data

from llmray.config import ModelConfig
from llmray.train import data as D
from llmray.train.cli import add_cli, config_from_args
from llmray.train.loop import lr_multiplier, read_metrics
from llmray.train.pretrain import PretrainConfig, run_pretrain, train_steps
from llmray.train.session import LocalSession

STEPS, FAIL_AT = 16, 10


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
    cfg = _cfg(corpus, out, fail_at_step=FAIL_AT, max_failures=1)
    result = run_pretrain(cfg)
    return cfg, result


def _reference_losses(cfg: PretrainConfig) -> list[float]:
    """Uninterrupted single-process run over the same rows (1 worker, 2x batch)."""
    from llmray.train.pretrain import prepare_corpus

    tok, mc, train, val = prepare_corpus(cfg)
    ref_cfg = dataclasses.replace(cfg, num_workers=1, batch_size=2 * cfg.batch_size, out=cfg.out + "/ref")
    ref_cfg = dataclasses.replace(ref_cfg, fail_at_step=None, checkpoint_every=10_000)
    batches = D.local_batches(train, cfg.seq_len, cfg.seed, ref_cfg.batch_size)
    train_steps(ref_cfg, mc, batches, val, LocalSession())
    return [r["loss"] for r in read_metrics(f"{ref_cfg.out}/metrics.jsonl")]


def test_failure_and_resume_reproduce_the_uninterrupted_curve(resumed_run):
    cfg, result = resumed_run
    records = read_metrics(result["metrics_file"])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # one curve, replayed steps replaced
    losses = [r["loss"] for r in records]
    ref = _reference_losses(cfg)
    # same rows and same arithmetic up to the all-reduce's summation order (and bf16 Newton-Schulz
    # rounding that order can flip): within 2e-3 nats; a wrong data position would differ by > 0.05
    np.testing.assert_allclose(losses, ref, atol=2e-3, rtol=0)
    # it learned: the last steps' loss is well below the first steps'
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
    with pytest.raises(ValueError, match="--optimizer must be muon or adamw"):
        dataclasses.replace(cfg, optimizer="sgd")
    with pytest.raises(ValueError, match="multiple of --grad-accum"):
        dataclasses.replace(cfg, batch_size=6, grad_accum=4)
    assert ModelConfig.preset("tiny").vocab_size == 512


def test_triton_kernels_on_ray_train_under_the_interpreter(ray_local, corpus, tmp_path):
    """``--kernels triton`` on CPU: Ray Train workers run the Triton kernels in Triton's interpreter
    (TRITON_INTERPRET=1, inherited from the driver's environment), bf16 autocast included."""
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    cfg = _cfg(corpus, tmp_path / "out", kernels="triton", precision="bf16", num_workers=1, max_steps=3,
               batch_size=4, checkpoint_every=3, eval_every=3, eval_windows=4)  # fmt: skip
    result = run_pretrain(cfg)
    records = read_metrics(result["metrics_file"])
    assert [r["step"] for r in records] == [1, 2, 3] and np.isfinite(records[-1]["val_loss"])
    assert os.path.exists(os.path.join(result["out"], "model.safetensors"))
