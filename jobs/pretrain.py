"""Entry for ``ray job submit --working-dir . -- python jobs/pretrain.py --config run.yaml [--flags]``.

Same flags as ``llmray pretrain`` (YAML keys = long flag names, flags override the file). Inside a Ray job
``ray.init()`` attaches to the cluster (RAY_ADDRESS); run directly, it starts an embedded Ray. Prints where
the model, metrics, loss curve and checkpoints went.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds the llmray package

from llmray.cli import _apply_config  # noqa: E402
from llmray.train.cli import add_cli  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jobs/pretrain.py")
    sub = parser.add_subparsers(dest="command")
    add_cli(sub)
    pretrain = sub.choices["pretrain"]
    pretrain.add_argument("--config", metavar="FILE.yaml", help="YAML file whose keys are long flag names")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a file path")
        _apply_config(pretrain, argv[i + 1])
    args = parser.parse_args(["pretrain", *argv])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
