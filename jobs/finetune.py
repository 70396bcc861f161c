"""Entry script for ``ray job submit -- python jobs/finetune.py --base DIR --data FILE.jsonl --out DIR ...``.

Same flags as ``llmray finetune``; ``jobs/finetune.py merge --base DIR --lora DIR --out DIR`` runs ``llmray
merge``. Inside a Ray job ``ray.init()`` connects to the job's cluster, so the TorchTrainer's workers land on
its (GPU) worker nodes; ``--out`` must then be storage every node sees (a shared volume or ``s3://``-mounted
path), since Ray Train keeps its checkpoints under ``--out/ray``.
"""

from __future__ import annotations

import argparse
import sys

from llmray.train.cli import add_cli


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("finetune", "merge"):
        argv = ["finetune", *argv]
    parser = argparse.ArgumentParser(prog="jobs/finetune.py")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
