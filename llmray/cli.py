"""The ``llmray`` command. Each package registers its own subcommands (``add_cli(subparsers)``);
this module adds ``--config FILE.yaml`` to every one of them (keys = long flag names; flags win).

One error style for every command: bad input prints ``error: <what is wrong>`` (one line, naming the flag
or file) and exits 2; anything else prints ``error: ...`` and exits 1. ``--debug`` (anywhere before a
``bench`` script's own flags) or ``LLMRAY_DEBUG=1`` shows the traceback instead. Ctrl-C prints one
``interrupted: ...`` line (a training run's: the checkpoint it kept) and exits 130; SIGTERM the same line as
``interrupted (SIGTERM): ...``, exit 143 (no Ray stack dump).
"""

from __future__ import annotations

import argparse
import importlib
import os
import runpy
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import NoReturn

import yaml

# module -> it defines add_cli(subparsers), which registers the subcommand(s) named in its comment
COMMAND_MODULES = (
    "llmray.train.cli",  # pretrain, finetune, merge
    "llmray.engine.cli",  # generate
    "llmray.serve.cli",  # serve
    "llmray.demo",  # demo
    "llmray.batch.cli",  # batch
)
BENCHES = ("engine", "kernels", "serve", "train", "finetune", "lora", "batch")
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with our error line: ``error: <message> (see `llmray X --help`)``, exit 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` after every option whose help does not already say its default (``none`` for an
    option left unset: an optional file, key or override); on/off flags (store_true) say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if text == argparse.SUPPRESS or "(default" in text or "default:" in text or "(required" in text:
            return action.help
        if not action.option_strings:
            return action.help
        if action.required:
            return f"{text} (required)".strip()
        if action.nargs == 0 or action.default is argparse.SUPPRESS:
            return action.help  # on/off flags
        if action.default is None or action.default == []:
            return f"{text} (default: none)".strip()
        return f"{text} (default: %(default)s)".strip()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llmray")
    except Exception:
        from llmray import __version__

        return __version__


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run a benchmark from bench/ (GPU numbers come from these)",
        add_help=False,
        description="Runs bench/WHICH.py with the remaining flags; `llmray bench WHICH --help` shows them.",
    )
    p.add_argument("which", choices=BENCHES, help="the benchmark script")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[1] / "bench" / f"{args.which}.py"
    if not script.exists():
        print(f"error: {script} not found (benchmarks run from a source checkout)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="llmray",
        description="Qwen3-architecture LLMs from pretraining to serving on Ray.",
        epilog="`llmray COMMAND --help` shows a command's flags and their defaults. --debug (or LLMRAY_DEBUG=1) "
        "shows tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"llmray {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    _add_bench(subparsers)
    for sub in subparsers.choices.values():
        sub.formatter_class = DefaultsHelpFormatter
        # argparse prints nothing, not even the default, for an option without help text
        for action in sub._actions:
            if action.option_strings and not action.help and action.nargs != 0:
                action.help = "(default: %(default)s)" if action.default is not None else "(default: none)"
        if sub.prog.endswith(" bench"):
            continue
        sub.add_argument("--config", metavar="FILE.yaml", help="YAML file whose keys are long flag names")
    return parser


def _apply_config(sub: argparse.ArgumentParser, path: str) -> None:
    """Set defaults of ``sub`` from a YAML file; a key naming no flag is an error."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise SystemExit(f"error: --config {path} not found") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"error: --config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: --config {path} must hold a mapping of flag names to values")
    by_flag = {}
    for action in sub._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                by_flag[opt[2:]] = action
    defaults = {}
    for key, value in data.items():
        flag = by_flag.get(str(key).replace("_", "-"))
        if flag is None or flag.dest in ("config", "help"):
            valid = ", ".join(sorted(k for k in by_flag if k not in ("config", "help")))
            raise SystemExit(f"error: {path}: unknown key {key!r}; valid keys: {valid}")
        defaults[flag.dest] = value
        flag.required = False
    sub.set_defaults(**defaults)


def _debug() -> bool:
    return os.environ.get("LLMRAY_DEBUG", "") not in ("", "0")


def _split_debug(argv: list[str]) -> list[str]:
    """Drop ``--debug`` (anywhere but among a bench script's flags) and set LLMRAY_DEBUG=1 for it."""
    end = 2 if argv[:1] == ["bench"] else len(argv)
    if "--debug" in argv[:end]:
        os.environ["LLMRAY_DEBUG"] = "1"
        argv = [a for i, a in enumerate(argv) if not (a == "--debug" and i < end)]
    return argv


def _run(argv: list[str]) -> int:
    if argv == ["--version"]:  # before the subcommands import torch and Ray: answers at once
        print(f"llmray {_version()}")
        return 0
    parser = build_parser()
    # the subcommand parsers by name: argparse keeps them on its (private) _SubParsersAction
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands: dict[str, argparse.ArgumentParser] = sub.choices
    if argv and argv[0] == "bench":
        if len(argv) == 1 or argv[1] in ("-h", "--help"):
            print(commands["bench"].format_help())
            return 0
        known, rest = parser.parse_known_args(argv)
        known.rest = rest
        return known.func(known)
    if argv and argv[0] in commands and "--config" in argv[1:]:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a file path")
        _apply_config(commands[argv[0]], argv[i + 1])
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    global _terminated, _ray_log
    _terminated = False
    out = getattr(args, "out", None) if args.command in ("pretrain", "finetune", "demo") else None
    _ray_log = Path(os.path.abspath(os.path.expanduser(str(out)))) / "ray.log" if out else None
    main_thread = threading.current_thread() is threading.main_thread()
    # llmray.ray_start puts it back after ray.init (Ray's own would dump Ray's C++ stack first)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return int(args.func(args) or 0)
    except (KeyboardInterrupt, SystemExit) as e:
        # Ray Train's own Ctrl-C handler aborts the run and calls sys.exit(0) inside ray.get, which Ray turns
        # into SystemExit(1) carrying ray_terminate_msg: the command exited 1 without a word
        if isinstance(e, SystemExit) and not hasattr(e, "ray_terminate_msg"):
            raise
        _stop_worker_output()
        line = interrupted_line(args)
        if _terminated:
            line = line.replace("interrupted", "interrupted (SIGTERM)", 1)
        print(line, file=sys.stderr, flush=True)
        return 143 if _terminated else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


_terminated = False  # a SIGTERM stopped the command (exit 143, not Ctrl-C's 130)


def _stop_worker_output() -> None:
    """After an interrupt, step lines still on their way from a Ray Train worker would print under the
    "interrupted" line (H200: `step 400/2000 ...` after it): Ray's printing of workers' output stops here."""
    ray, worker = sys.modules.get("ray"), sys.modules.get("ray._private.worker")
    if ray is None or worker is None or not ray.is_initialized():
        return
    if hasattr(worker, "_worker_logs_enabled"):
        setattr(worker, "_worker_logs_enabled", False)  # noqa: B010  # Ray's private module flag


_ray_log: Path | None = None  # a training command's OUT/ray.log: where a failed worker's traceback went


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (`kill`, a pod's or a scheduler's stop): stop now, with one "interrupted (SIGTERM)" line, exit
    143. Not Ray Train's graceful abort (Ctrl-C's): on a busy machine that waited past `timeout -k 8`'s
    SIGKILL; the driver's exit ends the run's actors, and checkpoints are written atomically."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt("SIGTERM")


def last_checkpoint(args: argparse.Namespace) -> Path | None:
    """The newest ``checkpoint_*`` directory a training command left under its ``--out`` / ``--storage-path``
    (Ray Train's, a few levels down), or None."""
    found: list[Path] = []
    for root in {getattr(args, "out", None), getattr(args, "storage_path", None)} - {None}:
        base = Path(os.path.abspath(os.path.expanduser(str(root))))
        for depth in range(1, 5):  # OUT/ray_results/NAME/checkpoint_x; the demo's OUT/base/ray_results/...
            found += [
                p
                for p in base.glob("/".join(["*"] * depth))
                if p.name.startswith("checkpoint_") and p.is_dir()
            ]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def interrupted_line(args: argparse.Namespace) -> str:
    """``interrupted: ...``: what a stopped command kept (a training run's last checkpoint, resumed by the
    same command)."""
    if args.command not in ("pretrain", "finetune", "demo"):
        return "interrupted"
    ckpt = last_checkpoint(args)
    if ckpt is None:
        return "interrupted: no checkpoint was written yet, so a new run starts from step 0"
    return f"interrupted: the last checkpoint {ckpt} is kept; the same command resumes from it"


def _message(e: BaseException) -> str:
    """A pydantic ValidationError as ``field: problem; ...`` (one line; a validator's own ValueError as its
    message alone, without pydantic's "Value error, " prefix), anything else as ``str(e)``."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            parts = []
            for it in errors():
                msg = it["msg"].removeprefix("Value error, ")
                loc = ".".join(map(str, it.get("loc", ())))
                parts.append(f"{loc}: {msg}" if loc else msg)
            return "; ".join(parts)
        except Exception:
            pass
    return str(e)


def _last_line(e: BaseException) -> str:
    """A Ray error's message holds the remote traceback: its last non-empty line says what went wrong."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = _split_debug(list(sys.argv[1:] if argv is None else argv))
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        if isinstance(e.code, str):  # raise SystemExit("error: ...")
            print(e.code if e.code.startswith("error:") else f"error: {e.code}", file=sys.stderr)
            return 2
        return int(e.code or 0)
    except USAGE_ERRORS as e:
        if _debug():
            raise
        print(f"error: {_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if _debug():
            raise
        where = "rerun with --debug"
        if _ray_log is not None and _ray_log.exists():  # a Ray Train worker's traceback is in Ray's log
            where = f"{_ray_log}, or rerun with --debug"
        print(f"error: {type(e).__name__}: {_last_line(e)}\n(the full traceback: {where})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
