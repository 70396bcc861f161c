"""``llmray batch``'s processor against ``LLM.generate`` on the same rows, in the same run, same machine.

    python bench/batch.py --out bench/results                        # GPU: 10,000 nano-vllm rows, 1 engine (+2)
    python bench/batch.py --workloads nano:1024,text:2048 --variants stage,in_engine --py-spy .data/serving/py-spy
    python bench/batch.py --quick --out /tmp/b                       # tiny model on CPU (checks the script)

Workloads (``--workloads NAME:ROWS,...``; the first is the headline): ``nano``, the nano-vllm shape (the batch
target's): prompts of random token ids and ``max_tokens`` both uniform in [100, 1024] (seed 0); ``text``:
tinyshakespeare passages of 150-1500 characters as text prompts (both sides tokenize), ``--max-tokens`` each.
All rows: temperature 0.6, ``ignore_eos`` (both sides generate the same tokens count). The model: Qwen3-0.6B
shapes with random bf16 weights and the 151,936-token BPE in ``--tokenizer-dir`` (``--quick``: the tiny preset
with a character tokenizer, on CPU, short rows).

1. ``LLM.generate`` over each workload in a child process, one engine for all (its start-up timed apart). With
   ``--side-by-side`` (default when 2 GPUs are visible) it runs on GPU 1 while ``llmray batch``'s one-engine
   runs use GPU 0, at the same time; otherwise before them.
2. ``run_batch`` (what ``llmray batch`` runs: the rows as a JSONL file, Ray Data, output files) per workload,
   per ``--variants`` (``stage``: rows tokenized by the prepare_batch stage, the default; ``in_engine``: in the
   engine actor, as before), for 1 engine and (2 GPUs, first workload only, right after its 1-engine runs)
   2 engines, timed from the call to the last output file.
   Each engine writes its timeline (``stats_dir``); ``steady`` = output tokens / (last finish - first row in
   any engine), the figure to set beside ``LLM.generate``'s. Start-up is reported as measured, never subtracted.

``batch_over_offline`` = steady tok/s of one engine / ``LLM.generate`` tok/s (engine already started);
``batch_over_offline_end_to_end`` = the same with each side's start-up; ``two_engines_over_one`` = steady tok/s
of 2 engines / 1 (``..._end_to_end`` likewise). The top-level figures are the first workload's; each workload's
are under ``workloads``. ``--py-spy BIN`` records each engine process (and the offline one) for ``--py-spy-s``
seconds into ``pyspy-*.txt`` (raw stacks). The JSON is rewritten after each step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batch_tools import (  # noqa: E402  (bench/ is the script's folder)
    VISIBLE,
    WORK,
    gpu_memory_used,
    make_model_dir,
    py_spy,
    shared_text,
    start_ray,
    sync,
    wait_gpus_free,
    watch_engines,
)


def make_rows(kind: str, n: int, args, text: str, vocab: int) -> tuple[list[dict], str]:
    """A workload's rows (the batch input format) and its description."""
    rng = random.Random(0)
    rows = []
    if kind == "nano":
        lo, hi = (10, 40) if args.quick else (100, 1024)
        for i in range(n):
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(lo, hi))]
            params = {"max_tokens": rng.randint(lo, hi), "temperature": 0.6, "ignore_eos": True}
            rows.append({"id": i, "prompt_token_ids": prompt, "sampling_params": params})
        return (
            rows,
            f"nano-vllm shape: random token-id prompts and max_tokens U[{lo}, {hi}], temperature 0.6, ignore_eos",
        )
    if kind != "text":
        raise SystemExit(f"unknown workload {kind!r} (nano, text)")
    for i in range(n):
        length = rng.randint(args.min_chars, args.max_chars)
        at = rng.randrange(0, len(text) - length)
        params = {"max_tokens": args.max_tokens, "temperature": 0.6, "ignore_eos": True}
        rows.append({"id": i, "prompt": text[at : at + length], "sampling_params": params})
    return rows, (
        f"tinyshakespeare passages of {args.min_chars}-{args.max_chars} characters as text prompts, "
        f"max_tokens {args.max_tokens}, temperature 0.6, ignore_eos"
    )


def offline_child(args) -> None:
    """LLM.generate over each rows file in its own process (one engine; start-up and each generation timed
    apart); prints one JSON line {name: result}."""
    from llmray.engine.llm import LLM
    from llmray.engine.sampling_params import SamplingParams

    t = time.perf_counter()
    llm = LLM(args.model_dir, **json.loads(args.engine))
    sync()
    startup = time.perf_counter() - t
    res = {}
    for k, (name, path) in enumerate(json.loads(args.rows_file).items()):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        prompts = [r.get("prompt") or r.get("prompt_token_ids") for r in rows]
        params = [SamplingParams(**r["sampling_params"]) for r in rows]
        if k == 0:
            py_spy(args.py_spy, os.getpid(), Path(args.out) / f"pyspy-offline-{name}.txt", args.py_spy_s, 3.0)
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        sync()
        seconds = time.perf_counter() - t
        tokens = sum(len(o.token_ids) for o in outs)
        r = dict(engine_startup_s=startup, seconds=seconds, output_tokens=tokens, tok_per_s=tokens / seconds)
        r["tok_per_s_with_startup"] = tokens / (seconds + startup)
        r["prompt_tokens"] = sum(len(o.prompt_token_ids) for o in outs)
        r["finished_at"] = time.time()
        res[name] = r
        print(json.dumps({name: r}), file=sys.stderr, flush=True)
    print(json.dumps(res))


def run_batch_timed(model_dir: Path, rows_path: Path, engine: dict, cuda: bool, engines: int, tag: str, args,
                    prepare_stage: bool = True) -> dict:  # fmt: skip
    """run_batch over the rows with ``engines`` engine actors; end-to-end time and each engine's timeline."""
    from llmray.batch.cli import run_batch

    out = WORK / f"out-{tag}-{time.time_ns()}"
    rows = sum(1 for _ in rows_path.open())
    shard_rows = max(8, min(256, rows // (8 * engines)))  # several shards (Ray Data tasks) per engine
    stats_dir = out / "_stats"
    stop = threading.Event()
    watch_engines(stats_dir, args, tag, stop)
    t0 = time.time()
    try:
        summary = run_batch(
            str(model_dir),
            str(rows_path),
            str(out),
            concurrency=engines,
            use_gpu=cuda,
            engine_kwargs=engine,
            batch_size=min(64, shard_rows),  # Ray Data merges blocks smaller than a batch into one task
            shard_rows=shard_rows,
            progress=True,
            stats_dir=str(stats_dir),
            prepare_stage=prepare_stage,
        )
    finally:
        stop.set()
    t_end = time.time()
    assert summary["errors"] == 0, summary
    seconds = t_end - t0
    res: dict = dict(
        engines=engines,
        prepare_stage=prepare_stage,
        rows=summary["rows"],
        shard_rows=shard_rows,
        output_tokens=summary["tokens"],
        seconds_end_to_end=seconds,
        tok_per_s_end_to_end=summary["tokens"] / seconds,
    )
    stats = [json.loads(f.read_text()) for f in sorted(stats_dir.glob("engine-*.json"))]
    res["engines_with_rows"] = sum(bool(st.get("rows")) for st in stats)
    stats = [st for st in stats if st.get("rows")]
    if not stats:
        return {**res, "error": f"no engine wrote its stats under {stats_dir}"}
    first = min(st["first_request"] for st in stats)
    last = max(st["last_finish"] for st in stats)
    tokens = sum(st["output_tokens"] for st in stats)
    res["startup_s (call -> first row in an engine)"] = first - t0
    res["startup_phases_s"] = dict(
        ray_data_and_actor_start=min(st["actor_start"] for st in stats) - t0,
        engine_start_incl_imports=max(st["engine_ready"] - st["actor_start"] for st in stats),
        engine_ready_to_first_row=min(st["first_request"] - st["engine_ready"] for st in stats),
    )
    res["tail_s (last row finished -> call returned)"] = t_end - last
    res["steady"] = dict(seconds=last - first, output_tokens=tokens, tok_per_s=tokens / (last - first))
    res["per_engine"] = [
        dict(
            rows=st["rows"],
            output_tokens=st["output_tokens"],
            first_row_s=st["first_request"] - t0,
            last_finish_s=st["last_finish"] - t0,
            tok_per_s=st["output_tokens"] / (st["last_finish"] - st["first_request"]),
            busy_s=st["engine_busy_s"],
        )
        for st in stats
    ]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--quick", action="store_true", help="tiny model, few rows, on CPU (checks the script)")
    ap.add_argument("--workloads", default="nano:10000", help="NAME:ROWS,... (nano, text); first = headline")
    ap.add_argument(
        "--variants", default="stage", help="stage,in_engine: where one engine's rows are tokenized"
    )
    ap.add_argument("--max-tokens", type=int, default=128, help="text workload")
    ap.add_argument("--min-chars", type=int, default=150, help="text workload")
    ap.add_argument("--max-chars", type=int, default=1500, help="text workload")
    ap.add_argument("--engines", default=None, help="engine counts, e.g. 1,2 (default: 1, and 2 if 2 GPUs)")
    ap.add_argument("--side-by-side", type=int, default=None, help="1: LLM.generate on GPU 1 meanwhile")
    ap.add_argument("--tokenizer-dir", default=str(REPO / ".data" / "bpe151k"))
    ap.add_argument("--py-spy", default=None, help="py-spy binary: record engines and LLM.generate")
    ap.add_argument("--py-spy-s", type=float, default=8.0)
    ap.add_argument("--py-spy-delay", type=float, default=4.0, help="seconds after an engine is up")
    ap.add_argument("--offline-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--rows-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.offline_child:
        return offline_child(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    counts = [int(c) for c in args.engines.split(",")] if args.engines else [1] + ([2] if gpus >= 2 else [])
    side = bool(args.side_by_side if args.side_by_side is not None else gpus >= 2)
    variants = args.variants.split(",")
    if args.quick:
        args.max_tokens, args.min_chars, args.max_chars = 16, 20, 120
    WORK.mkdir(parents=True, exist_ok=True)
    text = shared_text().read_text()
    t = time.perf_counter()
    model_dir = make_model_dir(args.quick, Path(args.tokenizer_dir), text)
    model_s = time.perf_counter() - t
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    work: dict[str, dict] = {}
    files: dict[str, str] = {}
    for spec in args.workloads.split(","):
        kind, _, n = spec.partition(":")
        n_rows = min(int(n or 1000), 64) if args.quick else int(n or 1000)
        rows, desc = make_rows(kind, n_rows, args, text, vocab)
        path = WORK / f"rows-{kind}-{n_rows}-{args.max_tokens}-{args.quick}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        work[kind] = {"rows": n_rows, "workload": desc}
        files[kind] = str(path)
    engine = dict(max_num_seqs=256, max_num_batched_tokens=8192) if cuda else dict(max_model_len=512)
    res: dict = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "gpus_visible": gpus,
        "model": "tiny preset, char tokenizer"
        if args.quick
        else "qwen3-0.6b shapes, random bf16 weights, 151,936-token BPE",
        "engine": engine,
        "offline_side_by_side": side,
        "model_dir_write_s": model_s,
        "workloads": work,
    }

    def save() -> None:
        first = work[next(iter(work))]
        for key in ("batch_over_offline", "batch_over_offline_end_to_end", "two_engines_over_one"):
            if key in first:
                res[key] = first[key]
        (out / "batch.json").write_text(json.dumps(res, indent=2))

    print(
        time.strftime("%H:%M:%S"),
        "offline LLM.generate",
        "on GPU 1, side by side" if side else "",
        flush=True,
    )
    child = [sys.executable, __file__, "--offline-child", "--model-dir", str(model_dir), "--out", str(out)]
    child += [
        "--rows-file",
        json.dumps(files),
        "--engine",
        json.dumps(engine),
        "--py-spy-s",
        str(args.py_spy_s),
    ]
    child += ["--py-spy", args.py_spy] if args.py_spy else []
    devices = VISIBLE.split(",") if VISIBLE else [str(i) for i in range(gpus)]
    baseline = gpu_memory_used() if cuda else []
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": devices[1]} if side else {})}
    log = open(out / "offline.log", "w")  # noqa: SIM115 (the child's stderr, read when it fails)
    proc = subprocess.Popen(child, stdout=subprocess.PIPE, stderr=log, text=True, env=env)

    def offline_done() -> None:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"offline child failed:\n{(out / 'offline.log').read_text()[-4000:]}")
        for name, r in json.loads(stdout.strip().splitlines()[-1]).items():
            work.setdefault(name, {})["offline_llm_generate"] = r
            work[name]["prompt_tokens"] = r["prompt_tokens"]
        save()
        print(time.strftime("%H:%M:%S"), "offline", stdout.strip().splitlines()[-1], flush=True)

    res["ray_init_s"] = start_ray(devices[0] if side else None)  # while the offline child starts
    if not side:
        offline_done()

    def ratios(w: dict) -> None:
        off, one = w.get("offline_llm_generate"), w.get("llmray_batch_streaming")
        for key, b in [(k, v) for k, v in w.items() if k.startswith("llmray_batch_streaming")]:
            if off and "steady" in b:
                suffix = key[len("llmray_batch_streaming") :]
                w["batch_over_offline" + suffix] = b["steady"]["tok_per_s"] / off["tok_per_s"]
                w["batch_over_offline_end_to_end" + suffix] = (
                    b["tok_per_s_end_to_end"] / off["tok_per_s_with_startup"]
                )
        two = w.get("llmray_batch_2_engines")
        if isinstance(two, dict) and isinstance(one, dict) and "steady" in two and "steady" in one:
            w["two_engines_over_one"] = two["steady"]["tok_per_s"] / one["steady"]["tok_per_s"]
            w["two_engines_over_one_end_to_end"] = two["tok_per_s_end_to_end"] / one["tok_per_s_end_to_end"]
            w["two_engines_sum_of_per_engine_rates_over_one"] = (
                sum(e["tok_per_s"] for e in two["per_engine"]) / one["steady"]["tok_per_s"]
            )

    # the headline workload with one engine, then with several (first workload only), then the others
    head, rest = next(iter(work)), list(work)[1:]
    runs = [(1, head, v) for v in variants if 1 in counts] + [(n, head, "stage") for n in counts if n > 1]
    runs += [(1, k, v) for k in rest for v in variants if 1 in counts]
    for n, kind, variant in runs:
        if variant == "in_engine" and kind != "text":
            continue  # tokenizing in the engine: only text prompts have any to do
        if cuda and n > gpus:
            res[f"llmray_batch_{n}_engines"] = f"skipped: {gpus} GPU(s) visible"
            continue
        if n > 1 and side:
            offline_done()  # both GPUs for the engines from here
            side = False
            res["ray_restart_s"] = start_ray(None)
        if cuda:  # the last run's engines (or the offline child) have let their GPU go
            res.setdefault("gpu_free_wait_s", []).append(wait_gpus_free(baseline, [0] if side else None))
        tag = f"{kind}-{n}-{variant}"
        print(time.strftime("%H:%M:%S"), f"llmray batch, {tag} ...", flush=True)
        try:
            b = run_batch_timed(model_dir, Path(files[kind]), engine, cuda, n, tag, args, variant == "stage")
        except Exception as e:  # keep what the other runs measure
            b = {"error": repr(e)[:2000], "output_tokens": None}
            print(time.strftime("%H:%M:%S"), tag, "failed:", repr(e), flush=True)
        off = work[kind].get("offline_llm_generate")
        if off and b["output_tokens"] not in (None, off["output_tokens"]):
            b["error"] = f"{b['output_tokens']} output tokens, LLM.generate {off['output_tokens']}"
        key = "llmray_batch_streaming" if n == 1 else f"llmray_batch_{n}_engines"
        work[kind][key + ("" if variant == "stage" else "_tokenize_in_engine")] = b
        ratios(work[kind])
        save()
        print(json.dumps(b), flush=True)
    if side:
        offline_done()
    for w in work.values():
        ratios(w)
    save()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
