"""``llmray batch``: run the engine over JSONL/Parquet files on Ray Data, resumable shard by shard.

Inputs are cut into shards (``--shard-rows``); Ray Data reads them, the processor generates, and this
driver collects each shard's rows and writes the shard's output file atomically once all its rows are back.
A rerun of the same command skips the shards whose files exist: a crash loses only the shards in
progress, and no row is written twice. Output rows: the input fields, ``input_line`` (1-based line or row
number in the input file), ``generated_text``, ``num_generated_tokens``, ``num_prompt_tokens``,
``finish_reason`` and ``error`` (None when fine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

from llmray.batch.io import Manifest, Shard, done_shards, plan_shards, read_shard, resolve_inputs, write_shard
from llmray.batch.rows import RESULT_COLUMNS
from llmray.engine.cli import lora_pair


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "batch", help="generate for every row of JSONL/Parquet files on Ray Data (resumable)"
    )
    p.add_argument("--model", required=True, help="Hugging Face Qwen3 model directory")
    p.add_argument(
        "--input", required=True, help="FILE | GLOB | DIR | s3://... (.jsonl or .parquet; comma list)"
    )
    p.add_argument("--output", required=True, help="output directory (one file per input shard)")
    p.add_argument("--lora", action="append", type=lora_pair, default=[], metavar="NAME=DIR",
                   help="an adapter rows may name in their 'lora' field (repeatable)")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=1, help="engines (actors); one GPU each with --use-gpu")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per engine (actor); without it, CPU")
    p.add_argument("--max-tokens", type=int, default=None, help="for rows without their own (default: 16)")
    p.add_argument(
        "--temperature", type=float, default=None, help="for rows without their own (default: 1.0)"
    )
    p.add_argument("--top-p", type=float, default=None, help="for rows without their own (default: 1.0)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per Ray Data batch")
    p.add_argument("--shard-rows", type=int, default=1000, help="rows per output file (the resume unit)")
    p.add_argument("--output-format", choices=("jsonl", "parquet"), default=None, help="default: the input's")
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine: sequences per step (default: 256)")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="engine: context window (default: the model's)"
    )
    p.add_argument(
        "--max-shards",
        type=int,
        default=None,
        help="process at most N pending shards this run (default: all)",
    )
    p.add_argument("--token-ids", action="store_true", help="also write generated_token_ids")
    p.add_argument("--sync", action="store_true", help="one batch at a time per engine (for comparison)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.add_argument("--stats-dir", default=None, help="each engine writes its timings here (engine-PID.json)")
    p.set_defaults(func=run_cli)


# Ray's C++ core worker in this driver writes this ERROR line to fd 2 for every Ray Data actor pool in Ray
# 2.60 (its map-transformer argument is an ObjectRef; ray-project/ray#57733): a restart of an engine actor
# needs that object, which this driver holds for the whole run. Sent to the log file with Ray's messages.
RAY_NATIVE_NOISE = (
    r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*has constructor arguments in the object store "
    r"and max_restarts > 0",
)


def run_cli(args: argparse.Namespace) -> int:
    defaults = {
        k: v
        for k, v in (
            ("max_tokens", args.max_tokens),
            ("temperature", args.temperature),
            ("top_p", args.top_p),
        )
        if v is not None
    }
    engine_kwargs = {
        k: v for k, v in (("max_num_seqs", args.max_num_seqs), ("max_model_len", args.max_model_len)) if v
    }

    def local(path: str) -> str:  # a local path as the caller meant it, before it reaches an engine actor
        return os.path.abspath(os.path.expanduser(path)) if "://" not in path else path

    import ray.data  # noqa: F401  # configures Ray Data's loggers: routed below, after that

    from llmray.ray_start import native_lines_to_file, ray_logs_to_file

    quiet = contextlib.ExitStack()
    if os.environ.get("LLMRAY_VERBOSE", "") in ("", "0"):  # Ray's and Ray Data's messages: to a file
        log_file = os.path.join(tempfile.gettempdir(), f"llmray-batch-{os.getpid()}.log")
        print(f"Ray's and Ray Data's messages: {log_file}", flush=True)
        quiet.enter_context(native_lines_to_file(log_file, RAY_NATIVE_NOISE))
        quiet.enter_context(ray_logs_to_file(log_file))
    try:
        with quiet:
            summary = run_batch(
                local(args.model),
                args.input,
                local(args.output),
                loras={name: local(d) for name, d in args.lora},
                concurrency=args.concurrency,
                use_gpu=args.use_gpu,
                sampling_params=defaults,
                engine_kwargs=engine_kwargs,
                batch_size=args.batch_size,
                shard_rows=args.shard_rows,
                output_format=args.output_format,
                max_shards=args.max_shards,
                include_token_ids=args.token_ids,
                streaming=not args.sync,
                progress=not args.no_progress,
                stats_dir=args.stats_dir,
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


class _Progress:
    """One status line: rows done of total, shards written, output tokens per second."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.rows = self.tokens = self.errors = self.shards = 0
        self.start = self.last = time.perf_counter()
        self.printed: tuple[int, int] | None = None
        self.tty = sys.stderr.isatty()

    def update(self, rows: int, tokens: int, errors: int, force: bool = False) -> None:
        self.rows, self.tokens, self.errors = self.rows + rows, self.tokens + tokens, self.errors + errors
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < (0.5 if self.tty else 10.0)):
            return
        if force and self.printed == (self.rows, self.shards):  # the last line already says it
            if self.tty:
                print(file=sys.stderr)
            return
        self.last, self.printed = now, (self.rows, self.shards)
        elapsed = max(now - self.start, 1e-9)
        rate = self.rows / elapsed
        eta = (self.total - self.rows) / rate if rate > 0 else float("inf")
        line = (
            f"batch: {self.rows}/{self.total} rows ({100 * self.rows / max(self.total, 1):.1f}%), "
            f"{self.shards} shards written, {self.errors} errors, {self.tokens / elapsed:.1f} tok/s, "
            f"{elapsed:.0f}s elapsed, eta {eta:.0f}s"
        )
        print(
            ("\r" + line) if self.tty else line, end="" if self.tty and not force else "\n", file=sys.stderr
        )


def _plan(inputs: list[str], output: str, shard_rows: int, fmt: str) -> list[Shard]:
    manifest = Manifest.load(output)
    if manifest is not None:
        if (manifest.inputs, manifest.shard_rows, manifest.output_format) != (inputs, shard_rows, fmt):
            raise ValueError(
                f"{output} holds a run of other inputs or settings (inputs {manifest.inputs[:3]}..., "
                f"--shard-rows {manifest.shard_rows}, format {manifest.output_format}); "
                "pass a new --output or the same flags to resume"
            )
        return manifest.plan()
    shards = plan_shards(inputs, shard_rows)
    Manifest(inputs, shard_rows, fmt, [asdict(s) for s in shards]).save(output)
    return shards


def _check_local_resources(concurrency: int, use_gpu: bool, cpus: float) -> None:
    import ray

    have = ray.cluster_resources()
    if use_gpu and have.get("GPU", 0) < concurrency:
        raise ValueError(
            f"--use-gpu --concurrency {concurrency} needs {concurrency} GPU(s); this machine has "
            f"{int(have.get('GPU', 0))} (drop --use-gpu to run on CPU, or lower --concurrency)"
        )
    need = cpus + 0.25  # the engines, the row preparers + one reader task
    if need > have.get("CPU", 0):
        raise ValueError(
            f"--concurrency {concurrency} needs {need:g} CPUs; this machine has {have.get('CPU', 0):g} "
            "(lower --concurrency)"
        )


def _output_row(row: dict[str, Any]) -> dict[str, Any]:
    try:
        fields = json.loads(row["_json"])
    except ValueError:
        fields = {}
    if not isinstance(fields, dict):
        fields = {}
    out = {**fields, "input_line": row["input_line"]}
    for name in (*RESULT_COLUMNS, "generated_token_ids"):
        if name in row:
            out[name] = row[name]
    return out


def shards_per_engine(pending: int, shard_rows: int, engines: int, max_num_seqs: int) -> int:
    """Shards (Ray Data tasks) an engine works on at once, none queued beyond: enough rows to keep its
    continuous batch full (8 x max_num_seqs: a shard holds its slot until its slowest row is done), and with
    several engines no more than its share (rows go out once every engine is up: ``wait_for_engines``)."""
    fill = -(-8 * max_num_seqs // max(shard_rows, 1))
    cap = fill if engines == 1 else min(fill, -(-pending // engines))
    return max(2, min(16, cap))


def run_batch(
    model: str,
    input_spec: str,
    output: str,
    *,
    loras: dict[str, str] | None = None,
    concurrency: int = 1,
    use_gpu: bool = False,
    sampling_params: dict[str, Any] | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    batch_size: int = 64,
    shard_rows: int = 1000,
    output_format: str | None = None,
    max_shards: int | None = None,
    include_token_ids: bool = False,
    streaming: bool = True,
    progress: bool = True,
    stats_dir: str | None = None,
    prepare_stage: bool = True,
) -> dict[str, Any]:
    """Generate for every input row not yet written; returns a summary (rows, errors, tokens, seconds).
    ``prepare_stage=False``: rows are tokenized in the engine actors (see ``build_processor``)."""
    import ray
    import ray.data

    from llmray.batch.io import input_format
    from llmray.batch.processor import build_processor

    if use_gpu and not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        import torch  # a local Ray would start: refuse a GPU-less machine before it does

        if torch.cuda.device_count() < concurrency:
            raise ValueError(
                f"--use-gpu --concurrency {concurrency} needs {concurrency} GPU(s); this machine has "
                f"{torch.cuda.device_count()} (drop --use-gpu to run on CPU, or lower --concurrency)"
            )
    inputs = resolve_inputs(input_spec)
    fmt = output_format or input_format(inputs[0])
    processor = build_processor(
        model,
        concurrency=concurrency,
        batch_size=batch_size,
        engine_kwargs=engine_kwargs,
        lora=loras,
        use_gpu=use_gpu,
        sampling_params=sampling_params,
        streaming=streaming,
        include_token_ids=include_token_ids,
        json_column="_json",
        stats_dir=stats_dir,
        # one engine: reading overlaps its start-up; several: rows go out once all are up (one up early
        # would otherwise take more than its share, or leave the others idle at the end)
        wait_for_engines=concurrency > 1,
        prepare_stage=prepare_stage,
    )
    shards = _plan(inputs, output, shard_rows, fmt)
    done = done_shards(output, fmt)
    pending = [s for s in shards if s.name not in done and s.rows > 0]
    if max_shards is not None:
        pending = pending[:max_shards]
    processor.max_concurrent_batches = shards_per_engine(
        len(pending), shard_rows, concurrency, (engine_kwargs or {}).get("max_num_seqs", 256)
    )
    already = sum(s.name in done for s in shards)
    summary = dict(shards=len(shards), skipped=already, pending=len(pending), written=0, rows=0, errors=0)
    if not pending:
        return {**summary, "tokens": 0, "seconds": 0.0}
    started = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(configure_logging=False, log_to_driver=False)
    if started:  # a local Ray of our own: an actor it cannot place would wait forever
        _check_local_resources(concurrency, use_gpu, processor.cpus_needed())
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [{"shard": json.dumps(asdict(s))} for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(read_shard, num_cpus=0.25)
    ds = processor(ds)
    by_name = {s.name: s for s in pending}
    buckets: dict[str, list[dict[str, Any]]] = {}
    bar = _Progress(sum(s.rows for s in pending), progress)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        rows = batch.to_pylist()
        for row in rows:
            name = row["_shard"]
            bucket = buckets.setdefault(name, [])
            bucket.append(_output_row(row))
            if len(bucket) == by_name[name].rows:
                write_shard(output, name, fmt, buckets.pop(name))
                bar.shards += 1
        bar.update(
            len(rows), sum(r["num_generated_tokens"] for r in rows), sum(bool(r["error"]) for r in rows)
        )
    bar.update(0, 0, 0, force=True)
    if buckets:  # cannot happen unless rows went missing: say so rather than write a partial shard
        raise RuntimeError(
            f"shards {sorted(buckets)[:5]} did not get all their rows back; rerun to retry them"
        )
    elapsed = time.perf_counter() - bar.start
    return {
        **summary,
        "written": bar.shards,
        "rows": bar.rows,
        "errors": bar.errors,
        "tokens": bar.tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(bar.tokens / max(elapsed, 1e-9), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmray")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["batch", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
