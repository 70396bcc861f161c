"""Pretraining on Ray Train (2 CPU workers, gloo): learns, survives a SIGKILLed worker on the same curve,
exports an HF model; the Triton kernels train like torch's on Ray Train workers (Triton's interpreter).

Two Ray Train runs in all (Ray start-up dominates on a 2-core machine), between them both parallel modes:
the fault test is FSDP2 (``--parallel fsdp``: sharded checkpoint gather, resume and export on Ray Train),
the Triton test DDP. Fault test: 2 workers, Muon; at step 10 the rank-0 worker process kills itself with
SIGKILL (no exception, no cleanup: as the OOM killer would) and ``FailureConfig(max_failures=1)`` restarts
the worker group from the step-8 checkpoint.
The uninterrupted reference is ``train_steps`` in 2 spawned gloo ranks (no Ray), each taking its half of
the same global batch: with ``preserve_order`` Ray's split hands worker 0 rows [0, B), worker 1 rows
[B, 2B), ... (tests/train/test_data.py), so both runs do the same arithmetic and must agree exactly.
(A raised exception instead of the kill goes through the same restart; tests/train/test_harness.py
resumes after one in-process.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from _support.data import shared_data
from safetensors.torch import load_file

from llmray.config import ModelConfig
from llmray.train import data as D
from llmray.train.cli import add_cli, config_from_args
from llmray.train.harness import resolve_precision
from llmray.train.loop import MODEL_FILE, lr_multiplier, read_metrics
from llmray.train.pretrain import PretrainConfig, prepare_corpus, run_pretrain, train_steps
from llmray.train.session import LocalSession

STEPS, KILL_AT = 16, 10


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
    cfg = _cfg(corpus, out, fail_at_step=KILL_AT, fail_kill=True, max_failures=1, parallel="fsdp")
    result = run_pretrain(cfg)
    return cfg, result


def _reference_rank(rank: int, port: int, cfg: dict, model_config: dict, train, val, ckpt: str) -> None:
    """One of 2 gloo ranks of the uninterrupted reference (``torch.multiprocessing.spawn`` target)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)  # as a Ray worker holding 0.5 CPU (OMP_NUM_THREADS=1)
    c = PretrainConfig(**cfg)
    b = c.batch_size
    rows = (x[rank * b : (rank + 1) * b] for x in D.local_batches(train, c.seq_len, c.seed, 2 * b))
    train_steps(c, ModelConfig(**model_config), rows, val, LocalSession(root=Path(ckpt), rank=rank, world=2))
    dist.barrier()
    dist.destroy_process_group()


def _reference(cfg: PretrainConfig, root: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Uninterrupted run over the same rows in 2 processes: (metrics, final checkpoint weights)."""
    import torch.multiprocessing as mp

    ref = dataclasses.replace(cfg, out=str(root / "ref"), fail_at_step=None, fail_kill=False)
    _, mc, train, val = prepare_corpus(ref)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (port, dataclasses.asdict(ref), dataclasses.asdict(mc), train, val, str(root / "ckpt"))
    mp.spawn(_reference_rank, args=args, nprocs=2, join=True)
    last = root / "ckpt" / f"checkpoint_{STEPS:08d}" / MODEL_FILE
    return read_metrics(root / "ref" / "metrics.jsonl"), load_file(str(last))


def test_worker_sigkill_resumes_on_the_uninterrupted_curve(resumed_run, tmp_path):
    cfg, result = resumed_run
    assert (Path(cfg.out) / ".injected_failure").exists()  # the kill happened (once)
    records = read_metrics(result["metrics_file"])
    assert [r["step"] for r in records] == list(
        range(1, STEPS + 1)
    )  # one curve, replayed steps 9-10 replaced
    losses = [r["loss"] for r in records]
    ref_records, ref_weights = _reference(cfg, tmp_path)
    # resumed from the step-8 weights, optimizer state and data position, the run redoes the same
    # arithmetic as the uninterrupted one (a wrong data position moves the loss by > 0.05, a wrong step or
    # lost optimizer state the weights by ~1e-2)
    np.testing.assert_allclose(losses, [r["loss"] for r in ref_records], atol=1e-5, rtol=0)
    state = json.loads((Path(result["checkpoint"]) / "trainer_state.json").read_text())["trainer"]
    assert state["step"] == STEPS and state["batches_consumed"] == STEPS
    weights = load_file(str(Path(result["checkpoint"]) / MODEL_FILE))
    assert set(weights) == set(ref_weights)
    worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
    assert worst < 1e-5, f"final weights max |diff| vs uninterrupted = {worst:.2e}"
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
    args = parser.parse_args(["pretrain", "--data", "x", "--out", "y", "--parallel", "fsdp"])
    assert config_from_args(args).parallel == "fsdp"
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--data", "x", "--out", "y", "--parallel", "zero3"])
    with pytest.raises(ValueError, match="--optimizer must be muon or adamw"):
        dataclasses.replace(cfg, optimizer="sgd")
    with pytest.raises(ValueError, match="multiple of --grad-accum"):
        dataclasses.replace(cfg, batch_size=6, grad_accum=4)
    assert ModelConfig.preset("tiny").vocab_size == 512


def test_triton_kernels_train_like_torch_on_ray_train_under_the_interpreter(ray_local, corpus, tmp_path):
    """``--kernels triton`` on CPU: 2 Ray Train workers (DDP) run the Triton kernels in Triton's interpreter
    (TRITON_INTERPRET=1, inherited from the driver's environment) through the training loop under bf16
    autocast with fp32 master weights, and the loss curve is the torch kernels' on the same rows in one
    process (the global batch of both workers). Small shapes: the interpreter's time grows with the rows;
    every kernel branch runs at any size."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert (
        resolve_precision("auto", "cpu") == torch.float32
        and resolve_precision("bf16", "cpu") == torch.bfloat16
    )
    cfg = _cfg(corpus, tmp_path / "out", kernels="triton", precision="bf16", num_workers=2, max_steps=2,
               batch_size=1, seq_len=16, checkpoint_every=2, eval_every=2, eval_windows=2)  # fmt: skip
    result = run_pretrain(cfg)
    records = read_metrics(result["metrics_file"])
    assert [r["step"] for r in records] == [1, 2] and np.isfinite(records[-1]["val_loss"])
    assert os.path.exists(os.path.join(result["out"], "model.safetensors"))
    ref = dataclasses.replace(cfg, kernels="torch", out=str(tmp_path / "torch"), num_workers=1, batch_size=2)
    _, mc, train, val = prepare_corpus(ref)
    train_steps(ref, mc, D.local_batches(train, ref.seq_len, ref.seed, ref.batch_size), val, LocalSession())
    torch_records = read_metrics(tmp_path / "torch" / "metrics.jsonl")
    # bf16 autocast: the kernels round where torch's ops round differently (~1e-3 relative on the loss)
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(
            [r[key] for r in records if key in r], [r[key] for r in torch_records if key in r], rtol=2e-2
        )
