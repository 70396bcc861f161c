"""``llmray demo``: the whole pipeline on the embedded default, on a laptop CPU, with no download.

Corpus: the Python standard library's own source files (present on every machine). Stages: train a BPE
tokenizer and pretrain a small model under Ray Train → derive chat data (docstring → function) from the
same corpus and fine-tune a LoRA adapter → serve base and adapter on Ray Serve → ask both through the
``openai`` client → print answers, losses and where every artifact is → shut down.

The console shows each stage with its time and losses; Ray's own logs go to ``OUT/ray.log`` and every step
to the runs' ``metrics.jsonl`` (``--verbose`` also prints Ray's logs and the workers' step lines).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import random
import socket
import sys
import sysconfig
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

from llmray.config import LoraConfig


class Knobs(TypedDict):
    """The demo's sizes: model preset, pretraining and fine-tuning steps, data sizes."""

    preset: str
    max_steps: int
    ft_steps: int
    seq_len: int  # pretraining windows
    ft_seq_len: int  # fine-tuning examples (a docstring -> function chat: ~100-250 tokens)
    corpus_mb: float
    chat_examples: int
    bpe_vocab: int


QUICK = Knobs(preset="tiny", max_steps=40, ft_steps=30, seq_len=128, ft_seq_len=128, corpus_mb=0.4,
              chat_examples=200, bpe_vocab=1024)  # fmt: skip
# 8 minutes in a fresh clone on two CPU cores shared with other jobs (load ~12, at nice 15; one torch thread: a
# second one made a step 4x slower on a busy 2-core box): the loss falls from ln(2048) = 7.6 to about 4.8
# (validation 5.4), the adapter lowers its validation loss (5.4 -> 5.1) and answers with a `def`
FULL = Knobs(preset="mini", max_steps=80, ft_steps=60, seq_len=128, ft_seq_len=256, corpus_mb=1.0,
             chat_examples=400, bpe_vocab=2048)  # fmt: skip
QUESTION = "Write a Python function `dedent`: Remove any common leading whitespace from every line in `text`."


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise RuntimeError(f"no Python standard library sources found under {root}; pass --data instead")
    return files


def write_corpus(files: list[Path], out_dir: Path, max_mb: float) -> list[Path]:
    """Copy source files (whole files, sorted by name) up to ``max_mb`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    total = 0
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
        lines = source.splitlines(keepends=True)  # (ast.get_source_segment re-splits the file per call)
        for node in ast.walk(tree):  # functions and methods
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            code = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])).rstrip()
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
        self.t_stage = self.t0

    def start(self, title: str) -> None:
        self.n += 1
        self.t_stage = time.time()
        print(f"\n[{self.n}/{self.total}] {title}  (t+{self.t_stage - self.t0:.0f}s)", flush=True)

    def took(self) -> str:
        return f"{time.time() - self.t_stage:.0f}s"


MEAN_OF = 10  # a step line's loss: the mean of the last 10 steps' (one batch's loss is noisy)


def step_rows(lines: list[str]) -> list[dict]:
    """The training-step rows of metrics.jsonl lines (a line still being written is skipped)."""
    rows = []
    for ln in lines:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(ln))
    return [r for r in rows if isinstance(r, dict) and "loss" in r and "step" in r and r.get("event") is None]


def step_line(rows: list[dict], upto: int, total: int) -> str:
    """``  step 100/400  loss 4.62``: the loss averaged over the ``MEAN_OF`` steps up to ``upto``."""
    last = [r for r in rows if r["step"] <= upto][-MEAN_OF:]
    return f"  step {last[-1]['step']}/{total}  loss {sum(r['loss'] for r in last) / len(last):.2f}"


def final_step_line(metrics_file: str | Path, total: int) -> str:
    rows = step_rows(Path(metrics_file).read_text().splitlines())
    return step_line(rows, rows[-1]["step"], total) if rows else "  no loss recorded"


@contextlib.contextmanager
def follow_steps(
    metrics_file: Path, total: int, t0: float, parts: int = 4, poll_s: float = 2.0, first: bool = True
) -> Iterator[None]:
    """While the block runs, one line ``  step 100/400  loss 4.62  (t+95s)`` for the run's first step (with
    ``first``: where pretraining starts, ln(vocab)) and each time the run writing ``metrics_file`` passes another 1/``parts`` of its ``total`` steps (rows
    appended before it started are not this run's; the last part is the stage's own summary line). The lines
    go to the ``sys.stdout`` of the caller's entry, even while the block redirects its own output."""
    marks = sorted(({1} if first else set()) | {max(1, round(total * i / parts)) for i in range(1, parts)})
    start = metrics_file.stat().st_size if metrics_file.exists() else 0
    stop = threading.Event()
    console = sys.stdout

    def watch() -> None:
        stopped = False
        while marks and not stopped:
            stopped = stop.wait(poll_s)  # once stopped: a last read of what the run wrote before it returned
            with contextlib.suppress(FileNotFoundError), metrics_file.open() as f:
                f.seek(start)
                rows = step_rows(f.read().splitlines())
                while marks and rows and rows[-1]["step"] >= marks[0]:
                    upto = next(r for r in rows if r["step"] >= marks[0])["step"]
                    line = f"{step_line(rows, upto, total)}  (t+{time.time() - t0:.0f}s)"
                    print(line, file=console, flush=True)
                    marks.pop(0)

    thread = threading.Thread(target=watch, name="demo-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=poll_s + 5)


@contextlib.contextmanager
def output_to(path: Path | None) -> Iterator[None]:
    """The block's prints (a training run's own driver lines) appended to ``path``; None: the console."""
    if path is None:
        yield
        return
    with open(path, "a") as f, contextlib.redirect_stdout(f):
        yield


def run_demo(args: argparse.Namespace) -> int:
    from llmray.config import ModelConfig
    from llmray.train.preflight import check_gpus  # imports neither torch nor Ray

    knobs = (QUICK if args.quick else FULL).copy()
    if args.preset is not None:
        knobs["preset"] = args.preset
    if args.max_steps is not None:
        knobs["max_steps"] = args.max_steps
    ModelConfig.preset(knobs["preset"])  # flags first: nothing is written and no Ray starts for bad input
    if knobs["max_steps"] < 1:
        raise ValueError(f"--max-steps must be >= 1, got {knobs['max_steps']}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    with socket.socket() as sock:  # stage 4 serves there: say so now, not after minutes of training
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds it
        try:
            sock.bind(("127.0.0.1", args.port))
        except OSError as e:
            raise ValueError(
                f"--port {args.port} is taken on 127.0.0.1 ({e.strerror}): pick a free one"
            ) from None
    check_gpus(args.use_gpu, 1)
    import openai  # the flags were good: now the heavy imports (seconds)
    import ray
    from ray import serve

    from llmray.serve.app import build_app
    from llmray.serve.deploy import deploy_until_serving
    from llmray.train.finetune import FinetuneConfig, run_finetune
    from llmray.train.pretrain import PretrainConfig, run_pretrain

    out = Path(args.out).resolve()
    stages = Stages(5)
    stages.start(
        "corpus: " + ("--data " + args.data if args.data else "the Python standard library's sources")
    )
    if args.data:
        import glob

        sources = sorted(Path(p) for p in glob.glob(args.data, recursive=True) if Path(p).is_file())
        if not sources:
            raise SystemExit(f"error: --data {args.data!r} matches no files")
    else:
        sources = stdlib_files()
    corpus = write_corpus(sources, out / "corpus", knobs["corpus_mb"])
    pairs = docstring_pairs(sources, knobs["chat_examples"])
    if len(pairs) < 20:
        raise SystemExit(f"error: only {len(pairs)} documented functions found in the corpus; need 20")
    n_val = max(10, len(pairs) // 10)
    chat_train = write_jsonl(pairs[n_val:], out / "chat" / "train.jsonl")
    chat_val = write_jsonl(pairs[:n_val], out / "chat" / "val.jsonl")
    mb = sum(p.stat().st_size for p in corpus) / 1e6
    print(
        f"{len(corpus)} files ({mb:.1f} MB), {len(pairs) - n_val} + {n_val} docstring->function chats -> {out}"
    )

    from llmray.train.preflight import local_ray_starts
    from llmray.train.ray_env import init_ray

    if args.verbose:
        os.environ["LLMRAY_VERBOSE"] = "1"
    embedded = local_ray_starts()  # its own Ray: ray.shutdown() ends Serve too (quietly)
    if embedded:
        # one machine: no cloud node drains for Ray Train's preemption watcher (an actor per run) to log,
        # and no idle Python worker per logical CPU started up front (workers start when needed)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # logical CPUs beyond the cores: train workers, Ray Data and Serve replicas ask fractions of them
    init_ray(out / "ray.log", worker_output=args.verbose, num_cpus=max(8, os.cpu_count() or 1))
    try:
        stages.start(f"pretrain ({knobs['preset']}, {knobs['max_steps']} steps, BPE tokenizer) on Ray Train")
        base_dir = out / "base"
        # a line per quarter of the steps (the workers' own step lines only with --verbose)
        follow = follow_steps if not args.verbose else lambda *a, **k: contextlib.nullcontext()
        quiet = None if args.verbose else out / "ray.log"  # the runs' own lines (data summary, paths) too
        with follow(base_dir / "metrics.jsonl", knobs["max_steps"], stages.t0), output_to(quiet):
            pre = run_pretrain(
                PretrainConfig(
                    data=str(out / "corpus" / "*.txt"), out=str(base_dir), preset=knobs["preset"], tokenizer="bpe",
                    bpe_vocab=knobs["bpe_vocab"], max_steps=knobs["max_steps"], seq_len=knobs["seq_len"],
                    batch_size=16, eval_every=max(10, knobs["max_steps"] // 4), checkpoint_every=knobs["max_steps"],
                    warmup_steps=max(5, knobs["max_steps"] // 20), use_gpu=args.use_gpu, lr=3e-3,
                    print_every=1 if args.verbose else None,
                )
            )  # fmt: skip
        last = pre["last"]
        val = f"validation {last.get('val_loss', float('nan')):.2f}"
        print(
            f"{final_step_line(pre['metrics_file'], knobs['max_steps'])}  {val}  took {stages.took()}",
            flush=True,
        )
        stages.start(f"fine-tune a LoRA adapter ({knobs['ft_steps']} steps) on Ray Train")
        adapter_dir = out / "adapter"
        with (
            follow(adapter_dir / "metrics.jsonl", knobs["ft_steps"], stages.t0, first=False),
            output_to(quiet),
        ):
            ft = run_finetune(
                FinetuneConfig(
                    base=str(base_dir), data=str(chat_train), val_data=str(chat_val), out=str(adapter_dir),
                    max_steps=knobs["ft_steps"], batch_size=8, seq_len=knobs["ft_seq_len"], lr=2e-3,
                    checkpoint_every=knobs["ft_steps"], use_gpu=args.use_gpu, print_every=1 if args.verbose else None,
                    lora=LoraConfig(r=8, alpha=16, targets="all-linear"),
                )
            )  # fmt: skip
        val = f"validation: base {ft['val_loss_before']:.2f} -> adapter {ft['val_loss_after']:.2f}"
        print(
            f"{final_step_line(adapter_dir / 'metrics.jsonl', knobs['ft_steps'])}  {val}  took {stages.took()}"
        )
        stages.start("serve base + adapter on Ray Serve (OpenAI API)")
        app = build_app(
            {
                "model": str(base_dir), "served_model_name": "demo-base",
                "loras": {"demo-docstrings": str(adapter_dir)},
                "use_gpu": args.use_gpu, "ingress_replicas": 1, "engine_kwargs": {"max_num_seqs": 16},
            }
        )  # fmt: skip
        deploy_until_serving(app, "127.0.0.1", args.port, name="llmray-demo")  # until /health answers
        print(f"serving on http://127.0.0.1:{args.port}/v1; took {stages.took()}", flush=True)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="demo")
        stages.start("ask both through the openai client")
        answers, usage = {}, {}
        served = sorted(m.id for m in client.models.list().data)
        print(f"served models: {', '.join(served)}; the question: {QUESTION}")
        for model in ("demo-base", "demo-docstrings"):  # the base model and the LoRA adapter, one replica
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": QUESTION}],
                max_tokens=48,
                temperature=0.0,
                frequency_penalty=1.0,  # a few-minute model repeats itself; the penalty keeps answers readable
            )
            answers[model] = reply.choices[0].message.content
            assert reply.usage is not None, "llmray reports usage on every chat completion"
            usage[model] = reply.usage.completion_tokens
            print(f"--- {model} ---\n{answers[model].strip()}", flush=True)
        if not embedded:  # on a shared cluster take the demo's app down (serve.shutdown logs retries)
            serve.shutdown()
    finally:
        ray.shutdown()
    last = pre["last"]
    summary: dict[str, Any] = {
        "pretrain": {"steps": last.get("step"), "loss": last.get("loss"), "val_loss": last.get("val_loss")},
        "finetune": {"val_loss_base": ft["val_loss_before"], "val_loss_adapter": ft["val_loss_after"]},
        "served_models": served,  # GET /v1/models
        "answers": answers,  # base model and adapter, through HTTP
        "completion_tokens": usage,
        "artifacts": {
            "corpus": str(out / "corpus"), "chat_data": str(out / "chat"), "base_model": str(base_dir),
            "pretrain_metrics": str(pre["metrics_file"]), "loss_curve": str(pre["loss_curve"]),
            "adapter": str(adapter_dir), "finetune_metrics": str(adapter_dir / "metrics.jsonl"),
        },
        "wall_s": round(time.time() - stages.t0, 1),
    }  # fmt: skip
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n=== llmray demo done in {summary['wall_s']:.0f}s ===")
    print(
        f"validation loss: pretraining {summary['pretrain']['val_loss']:.2f} after {summary['pretrain']['steps']} "
        f"steps; fine-tuning: base {ft['val_loss_before']:.2f} -> adapter {ft['val_loss_after']:.2f}"
    )
    print(f"in {out}: base/ (model, metrics.jsonl, loss_curve.png), adapter/, corpus/, chat/, ray.log")
    print(f"summary: {out / 'demo_summary.json'}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="the whole pipeline on a local Ray, on CPU, with no download")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"CI-sized settings: the {QUICK['preset']} preset, {QUICK['max_steps']} pretraining and "
        f"{QUICK['ft_steps']} fine-tuning steps (a few minutes)",
    )
    p.add_argument("--data", help="corpus glob (default: the Python standard library's own sources)")
    p.add_argument("--preset", help="model preset (default: mini; tiny with --quick)")
    p.add_argument(
        "--max-steps",
        type=int,
        help=f"pretraining steps (default: {FULL['max_steps']}; {QUICK['max_steps']} with --quick)",
    )
    p.add_argument(
        "--use-gpu", action="store_true", help="one GPU per Ray Train worker and per engine replica"
    )
    p.add_argument("--verbose", action="store_true", help="Ray's logs and every step line on the console too")
    p.add_argument("--out", default="runs/demo", help="where every artifact goes")
    p.add_argument(
        "--port", type=int, default=8000, help="HTTP port of the demo's server (a taken port is refused)"
    )
    p.set_defaults(func=run_demo)
