"""Faults in training: a crash in the middle of a checkpoint write.

``save_checkpoint`` / ``save_model`` killed (SIGKILL, in a subprocess) in the middle of each file they write:
the destination is either absent or complete; a half-written directory is never loadable.

A Ray Train worker process SIGKILLed mid-run (restart from the last checkpoint, same losses and final
weights as an uninterrupted run) is tests/train/test_pretrain.py's fault test: one Ray Train run for both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


# --- a crash while a checkpoint is being written ------------------------------------------------------------
# One interpreter imports torch and llmray once, then forks one child per case (the parent runs no torch op
# before forking, so the children start clean); each child dies by SIGKILL in the middle of writing its file.
CRASH = textwrap.dedent(
    """
    import json, os, signal, sys, torch
    import safetensors.torch as st
    from llmray.config import ModelConfig
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.train import loop
    from llmray.model import checkpoint

    def crash(what, victim, dest):
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

    status = {}
    for what, victim, dest in json.loads(sys.argv[1]):
        pid = os.fork()
        if pid == 0:
            crash(what, victim, dest)
            os._exit(0)  # finished without dying: the test fails on the status
        _, code = os.waitpid(pid, 0)
        status[dest] = -os.WTERMSIG(code) if os.WIFSIGNALED(code) else os.WEXITSTATUS(code)
    print(json.dumps(status))
    """
)
CASES = [("train", "optimizer.safetensors"), ("train", "trainer_state.json"), ("model", "model.safetensors")]


@pytest.fixture(scope="module")
def crashes(tmp_path_factory) -> dict[str, tuple[int, Path]]:
    """victim -> (the writer's exit status, its destination), all cases from one interpreter."""
    root = tmp_path_factory.mktemp("crash")
    cases = [(what, victim, str(root / victim / ("checkpoint" if what == "train" else "model")))
             for what, victim in CASES]  # fmt: skip
    for _, _, dest in cases:
        Path(dest).parent.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", CRASH, json.dumps(cases)],
        cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    return {victim: (status[dest], Path(dest)) for _, victim, dest in cases}


@pytest.mark.parametrize("victim", ["optimizer.safetensors", "trainer_state.json"])
def test_crash_while_writing_a_training_checkpoint(crashes, victim, tiny_model):
    from llmray.train.loop import load_checkpoint

    code, dest = crashes[victim]
    assert code == -9  # SIGKILLed in the middle of writing `victim`
    assert not dest.exists()  # nothing under the checkpoint's name: it is complete or absent
    leftovers = [p for p in dest.parent.iterdir() if p.name.startswith("checkpoint.tmp-")]
    assert len(leftovers) == 1  # the half-written temporary sibling is refused, not half-loaded
    with pytest.raises(Exception) as e:  # missing state file, truncated JSON or truncated safetensors
        load_checkpoint(leftovers[0], tiny_model)
    assert (
        isinstance(e.value, FileNotFoundError | ValueError | OSError) or "safetensor" in repr(e.value).lower()
    )


@pytest.mark.parametrize("victim", ["model.safetensors"])
def test_crash_while_exporting_a_model(crashes, victim, tiny_model_dir):
    from llmray.model.checkpoint import load_model

    code, dest = crashes[victim]
    assert code == -9
    with pytest.raises((FileNotFoundError, ValueError)):
        load_model(dest)  # never loads with half a file: the file is missing under its real name
    assert not (dest / victim).exists()
