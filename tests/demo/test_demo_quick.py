"""`llmray demo --quick` end to end (CI): answers through HTTP from base and adapter, the adapter lowers the
fine-tuning validation loss, and every artifact exists and loads (in llmray and in transformers/peft)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cmd = [
        sys.executable,
        "-m",
        "llmray.cli",
        "demo",
        "--quick",
        "--out",
        str(out),
        "--port",
        str(_free_port()),
    ]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "demo_summary.json").read_text()), proc.stdout


def test_answers_came_back_through_http_from_base_and_adapter(demo):
    _, summary, stdout = demo
    assert summary["served_models"] == ["demo-base", "demo-docstrings"]
    assert set(summary["answers"]) == {"demo-base", "demo-docstrings"}
    assert all(isinstance(a, str) and a for a in summary["answers"].values())
    assert all(n > 0 for n in summary["completion_tokens"].values())
    for stage in ("[1/5] corpus", "[2/5] pretrain", "[3/5] fine-tune", "[4/5] serve", "[5/5] ask"):
        assert stage in stdout  # a progress line per stage


def test_adapter_lowered_the_validation_loss(demo):
    _, summary, _ = demo
    ft = summary["finetune"]
    assert ft["val_loss_adapter"] < ft["val_loss_base"]
    assert summary["pretrain"]["steps"] == 40 and summary["pretrain"]["val_loss"] < 7.0  # ln(1024) = 6.93


def test_artifacts_exist_and_load(demo):
    out, summary, _ = demo
    for path in summary["artifacts"].values():
        assert Path(path).exists(), path
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from llmray.lora.adapter import load_adapter
    from llmray.model.checkpoint import load_model
    from llmray.model.tokenizer import Tokenizer

    base_dir, adapter_dir = summary["artifacts"]["base_model"], summary["artifacts"]["adapter"]
    ours = load_model(base_dir, kernels="torch").eval()
    hf = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor([Tokenizer.load(base_dir).encode("def dedent(text):")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
        tuned = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
        assert not torch.allclose(tuned(ids).logits, ours(ids), atol=1e-4)  # the adapter changes the model
    assert load_adapter("x", adapter_dir, ours.config, 64).rank == 8
    metrics = [
        json.loads(line) for line in Path(summary["artifacts"]["finetune_metrics"]).read_text().splitlines()
    ]
    assert metrics and all("loss" in m or "val_loss" in m for m in metrics)
