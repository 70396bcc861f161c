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
