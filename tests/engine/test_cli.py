"""``llmray generate`` through the engine."""

from __future__ import annotations

import argparse

from llmray.engine.cli import add_cli
from llmray.engine.llm import LLM
from llmray.engine.sampling_params import SamplingParams


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    return parser.parse_args(argv)


def test_generate_prints_the_greedy_completion(tiny_model_dir, capsys):
    args = _parse(["generate", "--model", str(tiny_model_dir), "--prompt", "hello", "--max-tokens", "5"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    expected = LLM(tiny_model_dir).generate("hello", SamplingParams(max_tokens=5, temperature=0.0))[0].text
    assert printed == expected + "\n"


def test_generate_reports_bad_values(tiny_model_dir, capsys):
    args = _parse(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--top-p", "0"])
    assert args.func(args) == 2
    assert "top_p" in capsys.readouterr().err


def test_generate_with_a_lora_adapter(tiny_model_dir, tmp_path, capsys):
    from _support.lora import ALL_LINEAR, make_peft_adapter

    from llmray.model.checkpoint import load_model

    make_peft_adapter(load_model(tiny_model_dir, kernels="torch"), tmp_path / "a", ALL_LINEAR, 4, 8, seed=5)
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "hello", "--max-tokens", "6"]
    args = _parse([*argv, "--lora", str(tmp_path / "a")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    params = SamplingParams(max_tokens=6, temperature=0.0)
    tuned = LLM(tiny_model_dir, loras={"a": tmp_path / "a"}).generate("hello", params, lora="a")[0]
    assert printed == tuned.text + "\n"
    assert tuned.token_ids != LLM(tiny_model_dir).generate("hello", params)[0].token_ids
    args = _parse([*argv, "--lora", str(tmp_path)])  # not an adapter directory: a clear error, exit 2
    assert args.func(args) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_generate_checks_flags_before_loading_the_engine(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import llmray.engine.llm as llm_module

    def no_engine(*a, **k):
        raise AssertionError("the engine must not load for bad flags")

    monkeypatch.setattr(llm_module, "LLM", no_engine)
    for argv, needle in (
        (["--model", str(tiny_model_dir), "--prompt", "x", "--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--model", str(tmp_path / "none"), "--prompt", "x"], "does not exist"),
    ):
        args = _parse(["generate", *argv])
        assert args.func(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and "Traceback" not in err, err
    monkeypatch.chdir(tiny_model_dir.parent)  # a relative --model resolves against the working directory
    args = _parse(["generate", "--model", tiny_model_dir.name, "--prompt", "x", "--max-tokens", "0"])
    assert args.func(args) == 2 and args.model == str(tiny_model_dir)
