"""Text a char tokenizer cannot encode is refused by name (file, 1-based line, characters; exit 2), never
replaced: in fine-tuning data, in a pretraining corpus read with a saved char tokenizer, in a prompt."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from llmray.cli import main
from llmray.config import ModelConfig


@pytest.fixture(scope="module")
def char_model_dir(tmp_path_factory):
    """A tiny model whose tokenizer is char-level, built from a corpus without accents."""
    from llmray.model.checkpoint import save_model
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.model.tokenizer import char_tokenizer

    tok = char_tokenizer("First Citizen: speak, speak.\n")
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("char_model")
    save_model(Qwen3ForCausalLM(cfg, kernels="torch"), out, tokenizer=tok)
    return out


def _chat(text: str) -> str:
    msgs = [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": text}]
    return json.dumps({"messages": msgs}) + "\n"


def test_finetune_names_file_line_and_characters(char_model_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(_chat("def fib(n): return n") * 2 + _chat("café — naïve") + _chat("ok") * 5)
    out = tmp_path / "out"
    assert main(["finetune", "--base", str(char_model_dir), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}:3: ") and "Traceback" not in err, err
    assert "'é' (U+00E9" in err and "'—' (U+2014" in err and "'ï'" in err
    assert not out.exists()


def test_pretrain_with_a_saved_char_tokenizer_names_the_line(char_model_dir, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("plain ascii line\nsecond line with ü\n")
    argv = [
        "pretrain",
        "--data",
        str(corpus),
        "--out",
        str(tmp_path / "o"),
        "--tokenizer",
        str(char_model_dir),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {corpus}:2: ") and "'ü'" in err, err


def test_generate_refuses_a_prompt_it_cannot_encode(char_model_dir, capsys):
    # ASCII the corpus never held (the README's own example) passes generate's checks: printable ASCII is
    # always in a char vocabulary (the engine run itself is tests/engine/test_cli.py's)
    from llmray.engine.cli import _check

    ok = argparse.Namespace(model=str(char_model_dir), lora=None, max_tokens=2)
    _check(ok, "def fib(n):\n    return {'a': [1, 2]} | ~x @ y  # `$%^&*`\t\\", "--prompt")
    argv = ["generate", "--model", str(char_model_dir), "--prompt", "hello\nsmile 😀", "--max-tokens", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --prompt:2: ") and "U+1F600" in err and "Traceback" not in err, err


def test_finetune_into_an_out_of_another_adapter_shape_is_refused(char_model_dir, tmp_path, capsys):
    """fine-tuning.md's `--out runs/adapter` after README's all-linear r16 run there "resumed" and died in the
    Ray Train worker (IndexError loading the optimizer state, a traceback): now one error line, exit 2; the
    same shape still resumes."""
    from llmray.cli import build_parser
    from llmray.train import preflight
    from llmray.train.cli import config_from_args

    data = tmp_path / "train.jsonl"
    data.write_text(_chat("ok") * 8)
    out = tmp_path / "out"
    adapter = out / "ray" / "finetune" / "checkpoint_2026-11-30_15-16-38.561106" / "adapter"
    adapter.mkdir(parents=True)
    (adapter.parent.parent / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's, sorts last
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16, "target_modules": targets}))
    argv = ["finetune", "--base", str(char_model_dir), "--data", str(data), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {out} holds checkpoints of another adapter (rank 16 on "), err
    assert "--lora-r 8 on q_proj,v_proj" in err and "Traceback" not in err
    same = config_from_args(
        build_parser().parse_args([*argv, "--lora-targets", "all-linear", "--lora-r", "16"])
    )
    assert any(n.startswith("resuming from the latest checkpoint") for n in preflight.check_finetune(same))
