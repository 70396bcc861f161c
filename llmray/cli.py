"""The ``llmray`` command. Each package registers its own subcommands (``add_cli(subparsers)``);
this module adds ``--config FILE.yaml`` to every one of them (keys = long flag names; flags win)."""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys
from pathlib import Path

import yaml

# module -> it defines add_cli(subparsers) registering the subcommand(s) named in DESIGN.md
COMMAND_MODULES = (
    "llmray.train.pretrain",  # pretrain
    "llmray.train.finetune",  # finetune, merge
    "llmray.engine.cli",  # generate
    "llmray.serve.cli",  # serve
    "llmray.demo",  # demo
)
BENCHES = ("engine", "kernels", "serve", "train", "finetune", "lora")


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="run a benchmark from bench/ (GPU numbers come from these)", add_help=False
    )
    p.add_argument("which", choices=BENCHES)
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
    parser = argparse.ArgumentParser(
        prog="llmray",
        description="Qwen3-architecture LLMs from pretraining to serving on Ray.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    _add_bench(subparsers)
    for sub in subparsers.choices.values():
        if sub.prog.endswith(" bench"):
            continue
        sub.add_argument("--config", metavar="FILE.yaml", help="YAML file whose keys are long flag names")
    return parser


def _apply_config(sub: argparse.ArgumentParser, path: str) -> None:
    """Set defaults of ``sub`` from a YAML file; a key naming no flag is an error."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise SystemExit(f"error: config file {path} not found") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"error: config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: config file {path} must hold a mapping of flag names to values")
    by_flag = {}
    for action in sub._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                by_flag[opt[2:]] = action
    defaults = {}
    for key, value in data.items():
        action = by_flag.get(str(key).replace("_", "-"))
        if action is None or action.dest in ("config", "help"):
            valid = ", ".join(sorted(k for k in by_flag if k not in ("config", "help")))
            raise SystemExit(f"error: {path}: unknown key {key!r}; valid keys: {valid}")
        defaults[action.dest] = value
        action.required = False
    sub.set_defaults(**defaults)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "bench":
        known, rest = parser.parse_known_args(argv)
        known.rest = rest
        return known.func(known)
    if argv and argv[0] in parser._subparsers._group_actions[0].choices and "--config" in argv[1:]:
        sub = parser._subparsers._group_actions[0].choices[argv[0]]
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a file path")
        _apply_config(sub, argv[i + 1])
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
