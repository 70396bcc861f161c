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
    seq_len: int
    corpus_mb: float
    chat_examples: int
    bpe_vocab: int


QUICK = Knobs(
    preset="tiny", max_steps=40, ft_steps=30, seq_len=128, corpus_mb=0.4, chat_examples=200, bpe_vocab=1024
)
FULL = Knobs(
    preset="mini", max_steps=400, ft_steps=150, seq_len=256, corpus_mb=2.0, chat_examples=800, bpe_vocab=2048
)
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


def loss_story(metrics_file: str | Path, points: int = 5) -> str:
    """``loss 6.93 (step 1) -> 4.10 (10) -> ... -> 2.31 (40)``: a few points of a run's loss curve."""
    rows = [json.loads(ln) for ln in Path(metrics_file).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r and r.get("event") is None]
    if not rows:
        return "no loss recorded"
    picks = sorted({round(i * (len(rows) - 1) / (points - 1)) for i in range(points)})
    parts = [f"{rows[i]['loss']:.2f} (step {rows[i]['step']})" for i in picks]
    return "loss " + " -> ".join(parts)


@contextlib.contextmanager
def follow_steps(
    metrics_file: Path, total: int, t0: float, parts: int = 4, poll_s: float = 2.0
) -> Iterator[None]:
    """While the block runs, one line ``  step 100/400  loss 4.62  (t+95s)`` each time the run writing
    ``metrics_file`` passes another 1/``parts`` of its ``total`` steps (rows appended before it started are
    not this run's; the last part is the stage's own summary line)."""
    marks = [max(1, round(total * i / parts)) for i in range(1, parts)]
    start = metrics_file.stat().st_size if metrics_file.exists() else 0
    stop = threading.Event()

    def watch() -> None:
        stopped = False
        while marks and not stopped:
            stopped = stop.wait(poll_s)  # once stopped: a last read of what the run wrote before it returned
            with contextlib.suppress(FileNotFoundError), metrics_file.open() as f:
                f.seek(start)
                lines = f.read().splitlines()
                rows = []
                for ln in lines:
                    with contextlib.suppress(ValueError):  # a line still being written
                        rows.append(json.loads(ln))
                rows = [r for r in rows if "loss" in r and "step" in r and r.get("event") is None]
                while marks and rows and rows[-1]["step"] >= marks[0]:
                    row = next(r for r in rows if r["step"] >= marks[0])
                    when = time.time() - t0
                    print(
                        f"  step {row['step']}/{total}  loss {row['loss']:.2f}  (t+{when:.0f}s)", flush=True
                    )
                    marks.pop(0)

    thread = threading.Thread(target=watch, name="demo-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=poll_s + 5)


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
    print(f"{len(corpus)} files ({sum(p.stat().st_size for p in corpus) / 1e6:.1f} MB) -> {out / 'corpus'}")
    print(f"{len(pairs) - n_val} + {n_val} docstring->function chats -> {out / 'chat'}")

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
        follow = follow_steps if not args.verbose else lambda *a: contextlib.nullcontext()
        with follow(base_dir / "metrics.jsonl", knobs["max_steps"], stages.t0):
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
        print(f"{loss_story(pre['metrics_file'])}; validation {last.get('val_loss', float('nan')):.2f}")
        print(f"took {stages.took()}", flush=True)
        stages.start(f"fine-tune a LoRA adapter ({knobs['ft_steps']} steps) on Ray Train")
        adapter_dir = out / "adapter"
        with follow(adapter_dir / "metrics.jsonl", knobs["ft_steps"], stages.t0):
            ft = run_finetune(
                FinetuneConfig(
                    base=str(base_dir), data=str(chat_train), val_data=str(chat_val), out=str(adapter_dir),
                    max_steps=knobs["ft_steps"], batch_size=8, seq_len=knobs["seq_len"], lr=2e-3,
                    checkpoint_every=knobs["ft_steps"], use_gpu=args.use_gpu, print_every=1 if args.verbose else None,
                    lora=LoraConfig(r=8, alpha=16, targets="all-linear"),
                )
            )  # fmt: skip
        print(f"{loss_story(adapter_dir / 'metrics.jsonl')}; took {stages.took()}", flush=True)
        stages.start("serve base + adapter on Ray Serve (OpenAI API)")
        app = build_app(
            {
                "model": str(base_dir), "served_model_name": "demo-base",
                "loras": {"demo-docstrings": str(adapter_dir)},
                "use_gpu": args.use_gpu, "ingress_replicas": 1, "engine_kwargs": {"max_num_seqs": 16},
            }
        )  # fmt: skip
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(app, name="llmray-demo", route_prefix="/")
        print(f"serving on http://127.0.0.1:{args.port}/v1; took {stages.took()}", flush=True)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="demo")
        stages.start("ask both through the openai client")
        answers, usage = {}, {}
        served = sorted(m.id for m in client.models.list().data)
        print(f"served models: {served}")
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
            print(f"--- {model} ---\n{answers[model]}\n")
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
        f"pretraining: val loss {summary['pretrain']['val_loss']:.3f} after {summary['pretrain']['steps']} steps"
    )
    print(
        f"fine-tuning: validation loss base {ft['val_loss_before']:.3f} -> adapter {ft['val_loss_after']:.3f}"
    )
    for key, path in summary["artifacts"].items():
        print(f"  {key:18s} {path}")
    print(f"  {'summary':18s} {out / 'demo_summary.json'}")
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
