"""The one training harness: resume is exact through the one checkpoint format, a crash while a checkpoint
is being replaced leaves the previous one usable. (The Triton and torch paths training alike under bf16
autocast on CPU is tests/train/test_pretrain.py's Triton test, on a Ray Train worker.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # before llmray.kernels defines any @triton.jit kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmray.config import ModelConfig  # noqa: E402
from llmray.model.qwen3 import Qwen3ForCausalLM  # noqa: E402
from llmray.train import data as D  # noqa: E402
from llmray.train import loop  # noqa: E402
from llmray.train.metrics import read_metrics  # noqa: E402
from llmray.train.pretrain import PretrainConfig, train_steps  # noqa: E402
from llmray.train.session import LocalSession  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _tokens(vocab: int, n: int = 6000) -> np.ndarray:
    rng = np.random.default_rng(0)
    succ = rng.integers(0, vocab, size=(vocab, 2))
    out = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        out[i] = succ[out[i - 1], i % 2]
    return out


def _run(out: Path, ckpt: Path | None, steps: int, **kw) -> list[dict]:
    mc = ModelConfig.preset("tiny")
    tokens = _tokens(mc.vocab_size)
    train, val = tokens[:5000], tokens[5000:]
    base = dict(data="-", out=str(out), preset="tiny", max_steps=steps, seq_len=32, batch_size=4, warmup_steps=1,
                eval_every=4, eval_windows=8, checkpoint_every=4, kernels="torch", lr=3e-3)  # fmt: skip
    cfg = PretrainConfig(**{**base, **kw})
    batches = D.local_batches(train, cfg.seq_len, cfg.seed, cfg.micro_batch_size)
    train_steps(cfg, mc, batches, val, LocalSession(root=ckpt))
    return read_metrics(out / "metrics.jsonl")


def test_resume_is_exact_through_the_one_format(tmp_path):
    ref = _run(tmp_path / "ref", tmp_path / "ref_ckpt", 8)
    with pytest.raises(RuntimeError, match="injected failure at step 5"):  # dies after checkpoint 4
        _run(tmp_path / "part", tmp_path / "ckpt", 8, fail_at_step=5)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint_00000004"]
    meta = json.loads((tmp_path / "ckpt" / "checkpoint_00000004" / loop.STATE_FILE).read_text())
    assert meta["trainer"]["step"] == 4 and meta["trainer"]["batches_consumed"] == 4
    resumed = _run(tmp_path / "part", tmp_path / "ckpt", 8)  # a re-run resumes from step 4
    assert [r["step"] for r in resumed] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in ref], rtol=0, atol=1e-6)
    a = loop.load_checkpoint(tmp_path / "ref_ckpt" / "checkpoint_00000008", m1 := _model())
    b = loop.load_checkpoint(tmp_path / "ckpt" / "checkpoint_00000008", m2 := _model())
    assert a["step"] == b["step"] == 8
    for (n, p), q in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    # the LocalSession keeps the 2 newest complete checkpoints, nothing half-written
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "checkpoint_00000004",
        "checkpoint_00000008",
    ]


def _model() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="torch")


def _save(path: Path, step: int) -> None:
    model = _model()
    with torch.no_grad():
        model.model.norm.weight.fill_(float(step))
    loop.save_checkpoint(path, model, None, {"step": step})


def test_crash_between_the_renames_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint"
    _save(path, 1)
    real = os.replace
    calls = []

    def crash_on_second(src, dst):  # the old one moved aside, then the process "dies"
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(loop.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _save(path, 2)
    monkeypatch.setattr(loop.os, "replace", real)
    assert not path.exists()
    model = _model()
    assert loop.load_checkpoint(path, model)["step"] == 1  # found aside, complete
    assert model.model.norm.weight.eq(1.0).all()
    _save(path, 3)  # the next save works and the stale copy is not picked over it
    assert loop.load_checkpoint(path, model)["step"] == 3


# one interpreter imports torch and llmray once and forks a child per stage (no torch op before the fork)
KILL = textwrap.dedent(
    """
    import json, os, signal, sys, torch
    from llmray.config import ModelConfig
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.train import loop

    def save_dying(path, stage):
        real, n = os.replace, [0]

        def dying_replace(src, dst):
            n[0] += 1
            if n[0] == stage:  # killed like the OOM killer kills: no exception, no cleanup
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)

        loop.os.replace = dying_replace
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="torch")
        with torch.no_grad():
            model.model.norm.weight.fill_(2.0)
        loop.save_checkpoint(path, model, None, {"step": 2})

    status = {}
    for path, stage in json.loads(sys.argv[1]):
        pid = os.fork()
        if pid == 0:
            save_dying(path, stage)
            os._exit(0)
        _, code = os.waitpid(pid, 0)
        status[str(stage)] = -os.WTERMSIG(code) if os.WIFSIGNALED(code) else os.WEXITSTATUS(code)
    print(json.dumps(status))
    """
)
STAGES = [1, 2]  # killed before moving the old one aside / before moving the new in


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict[int, tuple[int, Path]]:
    """stage -> (the writer's exit status, the checkpoint path that held step 1 before the write)."""
    root = tmp_path_factory.mktemp("kill")
    cases = [(str(root / f"stage{s}" / "checkpoint"), s) for s in STAGES]
    for path, _ in cases:
        _save(Path(path), 1)
    proc = subprocess.run([sys.executable, "-c", KILL, json.dumps(cases)], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    return {s: (status[str(s)], Path(p)) for p, s in cases}


@pytest.mark.parametrize("stage", STAGES)
def test_kill_during_replacement_leaves_the_previous_one_usable(killed, stage):
    code, path = killed[stage]
    assert code == -9
    model = _model()
    assert loop.load_checkpoint(path, model)["step"] == 1
    assert model.model.norm.weight.eq(1.0).all()
