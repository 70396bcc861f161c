"""Faults in training: a crash in the middle of a checkpoint write.

``save_checkpoint`` / ``save_model`` killed (SIGKILL, in a subprocess) in the middle of each file they write:
the destination is either absent or complete; a half-written directory is never loadable.

A Ray Train worker process SIGKILLed mid-run (restart from the last checkpoint, same losses and final
weights as an uninterrupted run) is tests/train/test_pretrain.py's fault test: one Ray Train run for both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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
