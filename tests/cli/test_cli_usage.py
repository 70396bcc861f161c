"""Every command as a new user meets it: --version, --help with defaults, one error line (exit 2, no
traceback, nothing written, no Ray) for bad input, paths resolved against the caller's cwd, stale state in
--out refused or named, --use-gpu without a GPU refused at once, a warm-up longer than the run named."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import time
import typing

import pytest

from llmray.cli import build_parser, main
from llmray.train import preflight
from llmray.train.cli import config_from_args
from llmray.train.finetune import FinetuneConfig
from llmray.train.pretrain import PretrainConfig

COMMANDS = ("pretrain", "finetune", "merge", "generate", "serve", "demo", "batch", "bench")


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 50)
    return path


def test_version_in_a_fresh_process():
    code = "import sys; from llmray.cli import main; r = main(['--version']); print(sorted(set(sys.modules) & {'torch', 'ray'}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("llmray "), proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"  # answered before torch or Ray is imported
    with pytest.raises(SystemExit) as e:  # argparse's own --version action answers the same
        build_parser().parse_args(["--version"])
    assert e.value.code == 0


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_exits_0_and_shows_defaults(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llmray " + command)
    if command != "bench":
        assert "(default" in out
    if command in ("pretrain", "finetune"):
        assert "--kernels {auto,triton,torch}" in out and "--use-gpu" in out
    if command == "pretrain":
        assert "mini" in out  # every preset named
    if command in ("pretrain", "finetune"):  # about 20 console lines a run; metrics.jsonl keeps every step
        assert "--print-every" in out and "steps / 20" in " ".join(out.split())


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_says_its_default_and_batch_says_the_real_ones():
    """Each option that takes a value shows its default (or `required`) in --help; batch's unset sampling and
    engine options name the defaults SamplingParams / EngineConfig apply."""
    missing, helps = [], {}
    for name, p in _subcommands().items():
        fmt = p._get_formatter()
        for a in p._actions:
            if name == "bench" or not a.option_strings or a.nargs == 0 or a.help == argparse.SUPPRESS:
                continue
            helps[(name, a.option_strings[0])] = text = fmt._get_help_string(a) or ""
            # argparse prints nothing at all for an option without help text, its default included
            if not (a.help or "").strip() or not re.search(r"\(default|default:|\(required", text):
                missing.append(f"{name} {a.option_strings[0]}: {text!r}")
    assert not missing, missing
    from llmray.config import EngineConfig
    from llmray.engine.sampling_params import SamplingParams

    sp, ec = SamplingParams(), EngineConfig()
    assert f"(default: {sp.max_tokens})" in helps[("batch", "--max-tokens")]
    assert f"(default: {sp.temperature})" in helps[("batch", "--temperature")]
    assert f"(default: {sp.top_p})" in helps[("batch", "--top-p")]
    assert f"(default: {ec.max_num_seqs})" in helps[("batch", "--max-num-seqs")]


def test_use_gpu_means_one_gpu_per_worker_everywhere():
    """`--use-gpu` asks for one GPU per unit of work (Ray Train worker, engine replica or actor) on every
    subcommand that has it; the help names the unit."""
    seen = {}
    for name, p in _subcommands().items():
        for a in p._actions:
            if "--use-gpu" in a.option_strings:
                seen[name] = a.help or ""
    assert set(seen) == {"pretrain", "finetune", "serve", "demo", "batch"}, seen
    assert all(text.startswith("one GPU per ") for text in seen.values()), seen


def _flattened_fields(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            names += _flattened_fields(hints[f.name], prefix + f.name + "_")
        else:
            names.append(prefix + f.name)
    return names


@pytest.mark.parametrize("command,cls", [("pretrain", PretrainConfig), ("finetune", FinetuneConfig)])
def test_every_config_field_is_a_flag(command, cls):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    dests = {a.dest for a in sub._actions}
    assert set(_flattened_fields(cls)) <= dests
    use_gpu = next(a for a in sub._actions if a.dest == "use_gpu")
    assert use_gpu.help.startswith("one GPU per Ray Train worker")  # one meaning on both


def test_paths_are_resolved_against_the_callers_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    args = parser.parse_args(
        [
            "finetune",
            "--base",
            "runs/base",
            "--data",
            "chat.jsonl",
            "--val-data",
            "v.jsonl",
            "--out",
            "runs/ft",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.base, cfg.data, cfg.val_data, cfg.out) == tuple(
        str(tmp_path / p) for p in ("runs/base", "chat.jsonl", "v.jsonl", "runs/ft")
    )
    args = parser.parse_args(
        [
            "pretrain",
            "--data",
            "a/*.txt,s3://b/c.txt",
            "--out",
            "o",
            "--tokenizer",
            "tok",
            "--storage-path",
            "st",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.data == f"{tmp_path}/a/*.txt,s3://b/c.txt"
    assert (cfg.out, cfg.tokenizer, cfg.storage_path) == (
        f"{tmp_path}/o",
        f"{tmp_path}/tok",
        f"{tmp_path}/st",
    )
    assert config_from_args(parser.parse_args(["pretrain", "--data", "x", "--out", "o"])).tokenizer == "char"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["pretrain", "--data", "{tmp}/missing.txt", "--out", "{tmp}/out"], "--data"),
        (["pretrain", "--data", "{corpus}", "--out", "{tmp}/out", "--preset", "nope"], "--preset"),
        (
            [
                "pretrain",
                "--data",
                "{corpus}",
                "--out",
                "{tmp}/out",
                "--tokenizer",
                "bpe",
                "--bpe-vocab",
                "100",
            ],
            "259",
        ),
        (["pretrain", "--data", "{corpus}", "--out", "{tmp}/out", "--batch-size", "0"], "--batch-size"),
        (["pretrain", "--data", "{corpus}", "--out", "{tmp}/out", "--max-steps", "x"], "--max-steps"),
        (["finetune", "--base", "{tmp}/nobase", "--data", "{corpus}", "--out", "{tmp}/out"], "nobase"),
        (["merge", "--base", "{tmp}/nobase", "--lora", "{tmp}/a", "--out", "{tmp}/out"], "nobase"),
        (["generate", "--model", "{tmp}/nomodel", "--prompt", "hi"], "nomodel"),
        (["serve", "--model", "{tmp}/m", "--lora", "no-equals-sign"], "NAME=DIR"),
        (["serve", "--model", "{tmp}/nomodel"], "model directory '{tmp}/nomodel' does not exist"),
        (["batch", "--model", "{tmp}/m", "--input", "i", "--output", "o", "--lora", "x="], "NAME=DIR"),
        (
            ["batch", "--model", "{tmp}/m", "--input", "{corpus}", "--output", "{tmp}/out", "--use-gpu"],
            "--use-gpu --concurrency 1 needs 1 GPU(s); this machine has 0",
        ),
        (["pretrain", "--out", "{tmp}/out"], "--data"),
        (
            ["pretrain", "--data", "{corpus}", "--out", "{tmp}/out", "--config", "{tmp}/none.yaml"],
            "none.yaml",
        ),
    ],
)
def test_bad_input_is_one_error_line_exit_2_nothing_written_no_ray(argv, needle, tmp_path, corpus, capsys):
    argv = [a.format(tmp=tmp_path, corpus=corpus) for a in argv]
    assert main(argv) == 2
    line = _err_line(capsys)
    assert needle.format(tmp=tmp_path) in line, line
    assert not (tmp_path / "out").exists() and not _ray_started()


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRAY_DEBUG", "0")  # restored after the test (--debug sets it to 1)
    with pytest.raises(FileNotFoundError):
        main(["--debug", "pretrain", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])


def test_stale_tokenizer_in_out_is_refused_or_named(tmp_path, corpus, capsys):
    from llmray.model.tokenizer import char_tokenizer

    out = tmp_path / "out"
    char_tokenizer(corpus.read_text()).save(out)  # what a failed earlier run left behind
    argv = ["pretrain", "--data", str(corpus), "--out", str(out), "--tokenizer", "bpe", "--bpe-vocab", "512"]
    assert main(argv) == 2
    line = _err_line(capsys)
    assert "holds a char tokenizer" in line and "--tokenizer bpe --bpe-vocab 512" in line
    cfg = config_from_args(build_parser().parse_args([*argv[:5], "--tokenizer", "char"]))
    notes = preflight.check_pretrain(cfg)
    assert any(n.startswith(f"reusing {out / 'tokenizer.json'}") for n in notes)


def test_use_gpu_without_a_gpu_fails_within_seconds(tmp_path, corpus, capsys, monkeypatch):
    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(preflight, "local_ray_starts", lambda: True)  # as on a laptop: an embedded Ray
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    t0 = time.monotonic()
    assert main(["pretrain", "--data", str(corpus), "--out", str(tmp_path / "out"), "--use-gpu"]) == 2
    assert time.monotonic() - t0 < 10
    assert "--use-gpu needs 1 GPU(s)" in _err_line(capsys) and not _ray_started()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster: an autoscaler may add GPU nodes
    monkeypatch.setattr(preflight, "local_ray_starts", lambda: False)
    preflight.check_gpus(True, 4)


def test_warmup_longer_than_the_run_is_named(tmp_path, corpus):
    args = build_parser().parse_args(
        ["pretrain", "--data", str(corpus), "--out", str(tmp_path / "o"), "--max-steps", "10"]
    )
    notes = preflight.check_pretrain(config_from_args(args))
    assert any(n.startswith("warning: --max-steps 10 is shorter than --warmup-steps 50") for n in notes)
    args = build_parser().parse_args(
        [
            "pretrain",
            "--data",
            str(corpus),
            "--out",
            str(tmp_path / "o"),
            "--max-steps",
            "10",
            "--warmup-steps",
            "2",
        ]
    )
    assert not any("warning" in n for n in preflight.check_pretrain(config_from_args(args)))


def test_a_pydantic_error_is_one_clean_line():
    from pydantic import BaseModel, Field, ValidationError, model_validator

    from llmray.cli import _message

    class Args(BaseModel):
        model: str
        replicas: int = Field(1, ge=1)

        @model_validator(mode="after")
        def _exists(self) -> Args:
            if self.model == "missing":
                raise ValueError("model directory 'missing' does not exist")
            return self

    with pytest.raises(ValidationError) as e:
        Args(model="missing")
    assert _message(e.value) == "model directory 'missing' does not exist"  # no "Value error, ", no dump
    with pytest.raises(ValidationError) as e:
        Args(model="m", replicas=0)
    assert _message(e.value) == "replicas: Input should be greater than or equal to 1"


@pytest.mark.parametrize("how", ["ray_train_abort", "keyboard_interrupt"])
def test_ctrl_c_during_training_says_what_is_kept_and_exits_130(how, tmp_path, corpus, capsys, monkeypatch):
    """Ctrl-C in a Ray Train stage: Ray Train's own SIGINT handler aborts the run and calls sys.exit(0) inside
    ray.get, which Ray turns into SystemExit(1) (``ray_terminate_msg``): the command exited 1 without a word.
    Now: one line naming the checkpoint kept, exit 130. (Ray's own exception, raised where the run was.)"""
    from ray._raylet import raise_sys_exit_with_custom_error_message

    import llmray.train.pretrain as pretrain

    out = tmp_path / "out"
    older, newer = (
        out / "ray_results" / "pretrain" / "checkpoint_a",
        out / "ray_results" / "pretrain" / "checkpoint_b",
    )

    def interrupted_run(cfg):
        older.mkdir(parents=True)
        newer.mkdir()
        os.utime(older, (1, 1))
        if how == "keyboard_interrupt":
            raise KeyboardInterrupt
        raise_sys_exit_with_custom_error_message("SystemExit was raised from the worker.", exit_code=1)

    monkeypatch.setattr(pretrain, "run_pretrain", interrupted_run)
    assert main(["pretrain", "--data", str(corpus), "--out", str(out), "--max-steps", "100"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"interrupted: the last checkpoint {newer} is kept; the same command resumes from it", err
    monkeypatch.setattr(
        pretrain, "run_pretrain", lambda cfg: raise_sys_exit_with_custom_error_message("x", 1)
    )
    assert (
        main(["pretrain", "--data", str(corpus), "--out", str(tmp_path / "o2"), "--max-steps", "100"]) == 130
    )
    assert "no checkpoint was written yet" in capsys.readouterr().err


def test_sigterm_during_training_is_one_line_exit_143(tmp_path, corpus, capsys, monkeypatch):
    """`kill` (SIGTERM) of a training command: Ray's driver handler printed Ray's C++ stack (two dozen
    ``logging.cc`` lines) before our line. Now one ``interrupted (SIGTERM): ...`` line, exit 143; the handler
    is ours again after Ray starts (Ray's ``ray.init`` puts its own in: here a stand-in does). It stops at once:
    not through Ray Train's graceful abort (Ctrl-C's), which outlived `timeout -k 8` on a busy machine."""
    import signal

    import llmray.train.pretrain as pretrain
    from llmray.ray_start import start_ray

    class StartsLikeRay:  # ray.init's effect on the driver's SIGTERM disposition
        def init(self, **kwargs) -> None:
            signal.signal(signal.SIGTERM, lambda s, f: sys.exit(s))

    aborted = []

    def ray_train_sigint(signum, frame):  # Ray Train's: abort the run, then sys.exit(0) inside ray.get
        aborted.append(signum)

    def killed_run(cfg):
        start_ray({}, ray=StartsLikeRay())
        monkeypatch.setattr(ray, "is_initialized", lambda: True)  # as after ray.init
        signal.signal(signal.SIGINT, ray_train_sigint)  # what Ray Train's fit() puts in
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        raise AssertionError("SIGTERM did not stop the run")

    import ray
    import ray._private.worker as ray_worker

    monkeypatch.setattr(ray_worker, "_worker_logs_enabled", True)  # restored after the test
    monkeypatch.setattr(pretrain, "run_pretrain", killed_run)
    before, sigint = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    t0 = time.monotonic()
    try:
        rc = main(["pretrain", "--data", str(corpus), "--out", str(tmp_path / "o"), "--max-steps", "9"])
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert rc == 143
    assert time.monotonic() - t0 < 4 and aborted == []
    err = capsys.readouterr().err.strip()
    assert err == "interrupted (SIGTERM): no checkpoint was written yet, so a new run starts from step 0", err
    assert ray_worker._worker_logs_enabled is False  # a worker's step line on its way is not printed after it
    assert signal.getsignal(signal.SIGTERM) is before


def test_serve_max_model_len_beyond_the_models_positions_is_refused_before_ray(tmp_path, capsys):
    """`llmray serve --max-model-len 8192` on a 1,024-position model started Ray and the replicas: refused at
    argument-check time, naming the flag and the model's limit (the YAML/`serve run` args too)."""
    import json

    from llmray.serve.app import ServeArgs

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3", "max_position_embeddings": 1024}))
    assert main(["serve", "--model", str(model), "--max-model-len", "8192"]) == 2
    line = _err_line(capsys)
    assert line.startswith("error: --max-model-len 8192 is longer than the model's 1024 positions"), line
    assert "use at most 1024" in line and not _ray_started()
    with pytest.raises(ValueError, match="max_model_len 2048 is longer than the model's 1024"):
        ServeArgs(model=str(model), engine_kwargs={"max_model_len": 2048})
    ServeArgs(model=str(model), engine_kwargs={"max_model_len": 1024})


def test_batch_paths_are_resolved_against_the_callers_cwd(tmp_path, monkeypatch):
    """`llmray batch` handed its model, adapter and output paths to the engine actors as typed (relative: right
    only where a worker's cwd happens to be the caller's); an input directory listed relative files."""
    import llmray.batch.cli as batch_cli
    from llmray.batch.io import resolve_inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "q.jsonl").write_text('{"prompt": "hi"}\n')
    seen = {}

    def run_batch(model, input_spec, output, loras, **kwargs):
        seen.update(model=model, output=output, loras=loras, inputs=resolve_inputs(input_spec))
        return {}

    monkeypatch.setattr(batch_cli, "run_batch", run_batch)
    argv = ["batch", "--model", "out/m", "--input", "data", "--output", "out/a", "--lora", "s=out/l"]
    assert main(argv) == 0
    assert seen == {
        "model": str(tmp_path / "out/m"),
        "output": str(tmp_path / "out/a"),
        "loras": {"s": str(tmp_path / "out/l")},
        "inputs": [str(tmp_path / "data/q.jsonl")],
    }


def test_a_failed_training_run_names_where_the_traceback_is(tmp_path, corpus, capsys, monkeypatch):
    """A Ray Train worker's failure: one error line (its last line) and where the worker's traceback is."""
    import llmray.train.pretrain as pretrain

    out = tmp_path / "out"

    def failing(cfg):
        out.mkdir(parents=True, exist_ok=True)
        (out / "ray.log").write_text("Traceback ...")
        raise RuntimeError("Training failed.\nIndexError: list index out of range")

    monkeypatch.delenv("LLMRAY_DEBUG", raising=False)
    monkeypatch.setattr(pretrain, "run_pretrain", failing)
    assert main(["pretrain", "--data", str(corpus), "--out", str(out), "--max-steps", "9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: RuntimeError: IndexError: list index out of range",
        f"(the full traceback: {out / 'ray.log'}, or rerun with --debug)",
    ], err


def test_pretrain_into_an_out_of_another_model_shape_is_refused(tmp_path, corpus, capsys):
    """A checkpoint of another preset in --out (an earlier run; the benchmarks' --smoke hit it in a fresh clone)
    was "resumed" and failed in the worker ("size mismatch for model.norm.weight"): one error line, exit 2."""
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "out"
    ckpt = out / "ray_results" / "pretrain" / "checkpoint_2026-11-30_15-47-01.171167"
    ckpt.mkdir(parents=True)
    (ckpt.parent / "checkpoint_manager_snapshot.json").write_text("{}")
    layers = {f"model.layers.{i}.input_layernorm.weight": torch.zeros(384) for i in range(6)}
    save_file({"model.norm.weight": torch.zeros(384), **layers}, str(ckpt / "model.safetensors"))
    argv = ["pretrain", "--data", str(corpus), "--out", str(out), "--preset", "tiny"]
    assert main(argv) == 2
    line = _err_line(capsys)
    assert "holds checkpoints of another model (6 layers x 384)" in line and "--preset tiny" in line, line
    same = config_from_args(build_parser().parse_args([*argv[:-1], "shakespeare-char"]))
    assert any(n.startswith("resuming from the latest checkpoint") for n in preflight.check_pretrain(same))
