"""Faults in training: a Ray Train worker process SIGKILLed mid-run; a crash in the middle of a checkpoint write.

1. Pretraining on 2 CPU workers (gloo); at step 10 the rank-0 worker process kills itself with SIGKILL (no
   exception, no cleanup: as the OOM killer would). ``FailureConfig(max_failures=1)`` restarts the worker
   group from the step-8 checkpoint; losses and final weights equal those of an uninterrupted run with the
   same 2 workers (tests/train/test_pretrain.py compares a raised failure with a one-process reference).
2. ``save_checkpoint`` / ``save_model`` killed (SIGKILL, in a subprocess) in the middle of each file they
   write: the destination is either absent or complete; a half-written directory is never loadable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _support.data import shared_data
from safetensors.torch import load_file

from llmray.train.loop import MODEL_FILE, read_metrics
from llmray.train.pretrain import PretrainConfig, run_pretrain

pytestmark = pytest.mark.timeout(400)
STEPS, KILL_AT = 16, 10
REPO = Path(__file__).resolve().parents[2]


def _cfg(corpus: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(
        data=str(corpus), out=str(out), preset="tiny", tokenizer="char", max_steps=STEPS, num_workers=2,
        seq_len=32, batch_size=8, checkpoint_every=4, eval_every=8, eval_windows=32, warmup_steps=2,
        kernels="torch", cpus_per_worker=0.5,
    )  # fmt: skip
    base.update(kw)
    return PretrainConfig(**base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(shared_data("tinyshakespeare/input.txt").read_text()[:40_000])
    return path


def test_worker_sigkill_resumes_from_the_last_checkpoint(ray_local, corpus, tmp_path):
    clean = run_pretrain(_cfg(corpus, tmp_path / "clean"))  # the uninterrupted run, same workers and rows
    cfg = _cfg(corpus, tmp_path / "run", fail_at_step=KILL_AT, fail_kill=True, max_failures=1)
    result = run_pretrain(cfg)
    assert (tmp_path / "run" / ".injected_failure").exists()  # the kill happened (once)

    records = read_metrics(result["metrics_file"])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # replayed steps 9-10 replaced
    ref = read_metrics(clean["metrics_file"])
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in ref], atol=1e-5, rtol=0)

    with open(Path(result["checkpoint"]) / "trainer_state.json") as f:
        state = json.load(f)["trainer"]
    assert state["step"] == STEPS and state["batches_consumed"] == STEPS
    weights = load_file(str(Path(result["checkpoint"]) / MODEL_FILE))
    ref_weights = load_file(str(Path(clean["checkpoint"]) / MODEL_FILE))
    assert set(weights) == set(ref_weights)
    # resumed from the step-8 weights, optimizer state and data position, the run redoes the same
    # arithmetic: the final weights match the uninterrupted run's (a wrong step or data position would
    # move them by ~1e-2)
    worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
    print(f"\nworker SIGKILL at step {KILL_AT}: final weights max |diff| vs uninterrupted = {worst:.2e}")
    assert worst < 1e-5, worst


# --- a crash while a checkpoint is being written ------------------------------------------------------------
CRASH = textwrap.dedent(
    """
    import os, signal, sys, torch
    import safetensors.torch as st
    from llmray.config import ModelConfig
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.train import loop
    from llmray.model import checkpoint

    what, victim, dest = sys.argv[1], sys.argv[2], sys.argv[3]
    real_save = st.save_file

    def dying_save(tensors, filename, metadata=None):
        # write part of the file, then die the way the OOM killer kills: no exception, no cleanup
        if os.path.basename(str(filename)).startswith(victim):
            real_save(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(tensors, filename, metadata=metadata)

    loop.save_file = dying_save
    checkpoint.save_file = dying_save
    real_write_text = type(loop.Path()).write_text

    def dying_write_text(self, data, *a, **k):
        if self.name.startswith(victim):
            real_write_text(self, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write_text(self, data, *a, **k)

    type(loop.Path()).write_text = dying_write_text
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="torch")
    if what == "train":
        opt = loop.build_optimizer(model, "adamw", lr=1e-3, muon_lr=0.02, weight_decay=0.0)
        model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long)).backward()
        opt.step()
        loop.save_checkpoint(dest, model, opt, {"step": 8, "batches_consumed": 8})
    else:
        checkpoint.save_model(model, dest)
    print("finished")
    """
)


def _crash_writing(what: str, victim: str, dest: Path) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", CRASH, what, victim, str(dest)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    return proc.returncode


@pytest.mark.parametrize("victim", ["optimizer.safetensors", "trainer_state.json"])
def test_crash_while_writing_a_training_checkpoint(tmp_path, victim, tiny_model):
    from llmray.train.loop import load_checkpoint

    dest = tmp_path / "checkpoint"
    assert _crash_writing("train", victim, dest) == -9  # SIGKILLed in the middle of writing `victim`
    assert not dest.exists()  # nothing under the checkpoint's name: it is complete or absent
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoint.tmp-")]
    assert len(leftovers) == 1  # the half-written temporary sibling is refused, not half-loaded
    with pytest.raises(Exception) as e:  # missing state file, truncated JSON or truncated safetensors
        load_checkpoint(leftovers[0], tiny_model)
    assert (
        isinstance(e.value, FileNotFoundError | ValueError | OSError) or "safetensor" in repr(e.value).lower()
    )


@pytest.mark.parametrize("victim", ["model.safetensors"])
def test_crash_while_exporting_a_model(tmp_path, victim, tiny_model_dir):
    from llmray.model.checkpoint import load_model

    dest = tmp_path / "model"
    assert _crash_writing("model", victim, dest) == -9
    with pytest.raises((FileNotFoundError, ValueError)):
        load_model(dest)  # never loads with half a file: the file is missing under its real name
    assert not (dest / victim).exists()
