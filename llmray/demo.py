"""``llmray demo``: the whole pipeline on the embedded default, on a laptop CPU, with no download.

Corpus: the Python standard library's own source files (present on every machine). Stages: train a BPE
tokenizer and pretrain a small model under Ray Train → derive chat data (docstring → function) from the
same corpus and fine-tune a LoRA adapter → serve base and adapter on Ray Serve → ask both through the
``openai`` client → print answers, losses and where every artifact is → shut down.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
import time
from pathlib import Path

QUICK = dict(preset="tiny", max_steps=60, ft_steps=40, seq_len=128, corpus_mb=0.6, chat_examples=240)
FULL = dict(preset="demo-small", max_steps=600, ft_steps=200, seq_len=256, corpus_mb=3.0, chat_examples=1200)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise RuntimeError(f"no Python standard library sources found under {root}; pass --data instead")
    return files


def write_corpus(files: list[Path], out_dir: Path, max_mb: float) -> list[Path]:
    """Copy source files (whole files, sorted by name) up to ``max_mb`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, total = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > max_mb * 1e6 and written:
            break
        dest = out_dir / (f.stem + ".txt")
        dest.write_text(text)
        written.append(dest)
        total += len(text)
    return written


def docstring_pairs(files: list[Path], limit: int, max_chars: int = 600) -> list[dict]:
    """Chat examples "docstring → function" from top-level functions with a docstring."""
    pairs = []
    for f in files:
        source = f.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            code = ast.get_source_segment(source, node)
            if not doc or not code or len(code) > max_chars:
                continue
            summary = doc.strip().splitlines()[0]
            pairs.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Write a Python function `{node.name}`: {summary}"},
                        {"role": "assistant", "content": code},
                    ]
                }
            )
    random.Random(0).shuffle(pairs)
    return pairs[:limit]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Stages:
    """Prints a numbered header and the elapsed time for each stage."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0 = total, 0, time.time()

    def start(self, title: str) -> None:
        self.n += 1
        print(f"\n[{self.n}/{self.total}] {title}  (t+{time.time() - self.t0:.0f}s)", flush=True)
