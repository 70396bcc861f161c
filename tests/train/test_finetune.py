"""Fine-tuning runs: LoRA and QLoRA lower the validation loss, only adapters change, resume is exact,
a 2-worker QLoRA run on Ray Train writes a mergeable adapter, bad data stops the run before anything is
written."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from llmray.config import LoraConfig
from llmray.model.checkpoint import load_model
from llmray.train import adapters, finetune, peft_adapters
from llmray.train import cli as train_cli
from llmray.train.chat_data import ChatDataError
from llmray.train.session import LocalSession

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

THINGS = ["apple", "sky", "grass", "sun", "coal", "snow", "rose", "sea", "leaf", "lemon"]
COLOURS = ["red", "green", "blue", "yellow", "black", "white"]


def make_chat_jsonl(path: Path, n: int, offset: int = 0) -> Path:
    """A tiny learnable chat task: the assistant's reply follows a fixed pattern."""
    rows = []
    for i in range(offset, offset + n):
        thing, colour = THINGS[i % len(THINGS)], COLOURS[(i * 7) % len(COLOURS)]
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You answer briefly."},
                    {"role": "user", "content": f"What color is the {thing}?"},
                    {"role": "assistant", "content": f"The {thing} is {colour}."},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    return make_chat_jsonl(d / "train.jsonl", 48), make_chat_jsonl(d / "val.jsonl", 8, offset=100)


def _cfg(base, chat_files, out, **kw) -> finetune.FinetuneConfig:
    defaults = dict(
        lora=LoraConfig(r=8, alpha=16, targets="all-linear"),
        max_steps=16,
        lr=2e-2,
        batch_size=8,
        seq_len=96,
        checkpoint_every=8,
        kernels="torch",
    )
    defaults.update(kw)
    return finetune.FinetuneConfig(
        base=str(base), data=str(chat_files[0]), val_data=str(chat_files[1]), out=str(out), **defaults
    )


def _run_local(cfg: finetune.FinetuneConfig, ckpt_root: Path | None = None) -> tuple[dict, LocalSession]:
    train, val, stats = finetune.prepare_data(cfg)
    session = LocalSession(root=ckpt_root)
    config = {"cfg": cfg.to_dict(), "train": train, "val": val, "pad_id": stats["pad_id"]}
    return finetune.train_loop(config, session), session


def _adapter(session: LocalSession) -> Path:
    return session.reports[-1][1] / "adapter"


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_tiny_run_lowers_val_loss_and_changes_only_adapters(
    tiny_model_dir, chat_files, tmp_path, qlora, capsys
):
    cfg = _cfg(
        tiny_model_dir,
        chat_files,
        tmp_path / "out",
        lora=LoraConfig(r=8, alpha=16, targets="all-linear", qlora=qlora),
    )
    metrics, session = _run_local(cfg, ckpt_root=tmp_path / "ckpt")
    assert metrics["step"] == 16 and len(session.reports) == 2  # checkpoints at steps 8 and 16
    # a clear fall (0.27 to 0.55 nats over seeds and LoRA implementations), far above the noise
    assert metrics["val_loss_after"] < metrics["val_loss_before"] - 0.2, metrics
    assert "val_loss_after" in session.reports[-1][0]
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 16/16 ")]
    assert len(last) == 1 and "val_loss" in last[0], last  # the last step: one line, with validation
    adapter = _adapter(session)
    # only adapter tensors were saved, and the base on disk is what training started from
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    # only adapter parameters changed: the trained PeftModel's base equals the checkpoint's
    base = load_model(tiny_model_dir, dtype=torch.float32, kernels="torch").state_dict()
    trained = peft_adapters.load_with_adapter(tiny_model_dir, adapter)
    for name, value in trained.base_model.model.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(value, base[name.replace(".base_layer", "")], rtol=0, atol=0)
    # the trained adapter on transformers gives llmray's logits
    ids = torch.randint(0, 300, (2, 20))
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, trained(ids), rtol=1e-4, atol=1e-4)


def test_resume_from_checkpoint_is_exact(tiny_model_dir, chat_files, tmp_path):
    """8 steps + resume to 16 gives the same adapter as 16 uninterrupted steps (data order from the step)."""
    from safetensors.torch import load_file

    cfg = _cfg(tiny_model_dir, chat_files, tmp_path / "out", lora=LoraConfig(r=4, targets="attn"))
    _, full = _run_local(cfg, ckpt_root=tmp_path / "full")
    # the same run's checkpoints without the final one: the next run resumes from step 8
    import shutil

    part_root = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part_root)
    shutil.rmtree(part_root / "checkpoint_00000016")
    metrics, resumed = _run_local(cfg, ckpt_root=part_root)
    assert metrics["step"] == 16 and len(resumed.reports) == 1
    a = load_file(str(_adapter(full) / "adapter_model.safetensors"))
    b = load_file(str(_adapter(resumed) / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert metrics["val_loss_before"] == full.reports[-1][0]["val_loss_before"]


def test_bad_line_stops_before_anything_is_written(tiny_model_dir, chat_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = chat_files[0].read_text().splitlines()
    lines[6] = lines[6][:-2]  # line 7: cut JSON
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    cfg = _cfg(tiny_model_dir, chat_files, out)
    cfg.data = str(bad)
    with pytest.raises(ChatDataError, match=r"bad\.jsonl:7: not valid JSON"):
        finetune.run_finetune(cfg)
    assert not out.exists()
    # the CLI reports it and exits 2
    parser = argparse.ArgumentParser()
    train_cli.add_cli(parser.add_subparsers())
    args = parser.parse_args(
        ["finetune", "--base", str(tiny_model_dir), "--data", str(bad), "--out", str(out)]
    )
    assert args.func(args) == 2 and not out.exists()


def test_ray_train_run_two_workers_qlora(ray_local, tiny_model_dir, chat_files, tmp_path, capsys):
    """Two Ray Train workers (gradients all-reduced), QLoRA: the adapter, its record and metrics are written.

    A worker failure on Ray Train restarts from the last checkpoint through the same RaySession as
    pretraining (tests/train/test_pretrain.py kills a worker); fine-tuning's own resume is exact in-process
    (test_resume_from_checkpoint_is_exact), so this run has no injected failure."""
    out = tmp_path / "run"
    cfg = _cfg(
        tiny_model_dir,
        chat_files,
        out,
        num_workers=2,
        batch_size=4,
        max_steps=4,
        checkpoint_every=4,
        lora=LoraConfig(r=4, alpha=8, targets="attn", qlora=True),
    )
    with pytest.MonkeyPatch.context() as env:  # Ray Train's controller polls its workers every 2 s by default
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        metrics = finetune.run_finetune(cfg)
    assert metrics["step"] == 4 and metrics["val_loss_after"] < metrics["val_loss_before"]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    saved = json.loads((out / "llmray.json").read_text())
    assert saved["val_loss_after"] == metrics["val_loss_after"] and saved["lora"]["qlora"] is True
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r and r.get("event") is None] == list(range(1, 5))
    assert rows[-1]["event"] == "final" and rows[-1]["val_loss_before"] == metrics["val_loss_before"]
    assert "validation loss" in capsys.readouterr().out
    # merge the QLoRA-trained adapter into the full-precision base
    merged = peft_adapters.merge_adapter(tiny_model_dir, out, tmp_path / "merged", dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(merged, kernels="torch")(ids),
            peft_adapters.load_with_adapter(tiny_model_dir, out)(ids),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_tiny_run_on_cuda(tiny_model_dir, chat_files, tmp_path, qlora):
    """On CUDA: bf16 base (NF4 for QLoRA, bf16 compute), fp32 adapters, bf16 autocast; the loss falls."""
    import bitsandbytes as bnb

    cfg = _cfg(
        tiny_model_dir,
        chat_files,
        tmp_path / "out",
        lora=LoraConfig(r=8, alpha=16, targets="all-linear", qlora=qlora),
    )
    train, val, stats = finetune.prepare_data(cfg)
    session = LocalSession(device="cuda")
    metrics = finetune.train_loop(
        {"cfg": cfg.to_dict(), "train": train, "val": val, "pad_id": stats["pad_id"]}, session
    )
    assert metrics["val_loss_after"] < metrics["val_loss_before"] - 0.2, metrics
    pm = finetune.build_model(cfg, torch.device("cuda"))
    q = pm.model.layers[0].self_attn.q_proj  # llmray's own LoRA layer (the default lora_impl)
    assert isinstance(q, adapters.LoraLinear) and q.lora_A.dtype == torch.float32
    if qlora:
        assert q.base_layer.weight.device.type == "cuda"
        assert (
            isinstance(q.base_layer.weight, bnb.nn.Params4bit)
            and q.base_layer.compute_dtype == torch.bfloat16
        )
    else:
        assert q.base_layer.weight.dtype == torch.bfloat16
