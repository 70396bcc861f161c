"""``llmray batch``'s processor against ``LLM.generate`` on the same rows, in the same run, same machine.

    python bench/batch.py --out bench/results                        # GPU: 4,096 rows, 1 engine, then 2 if 2 GPUs
    python bench/batch.py --quick --out /tmp/b                       # tiny model on CPU (checks the script)
    python bench/batch.py --occupancy                                # CPU: engine steps, streaming vs synchronous

Rows: ``--rows`` prompts cut from the shared data's tinyshakespeare text at seeded random offsets (lengths
uniform in [``--min-chars``, ``--max-chars``] characters: with the 151,936-entry BPE tokenizer in
``--tokenizer-dir``, about 3 characters a token), each with ``max_tokens`` = ``--max-tokens``, temperature 0.6
and ``ignore_eos`` (so both sides generate the same number of tokens). The model: Qwen3-0.6B shapes with
random bf16 weights and that tokenizer, written under /tmp (``--quick``: the tiny preset with a character
tokenizer, on CPU). The prompts are text, so both sides tokenize.

1. ``LLM.generate`` over all rows in a child process: the engine's start-up (``LLM(...)``: model load, KV
   sizing, warm-up and graph capture) and the generation are timed separately.
2. ``run_batch`` (what ``llmray batch`` runs: the rows as a JSONL file, Ray Data, one engine actor per GPU,
   output files) for each engine count in ``--engines`` (default 1, and 2 when two GPUs are visible), timed
   from the call to the last output file, start-up included. Each engine also writes its own timeline
   (``stats_dir``): when it started, when its engine was ready, when it got its first row and finished its
   last; ``steady`` = output tokens / (last finish - first row) inside the engine(s), the figure to set
   beside ``LLM.generate``'s. Start-up is reported as measured, never subtracted.

``batch_over_offline`` = steady tok/s of one engine / ``LLM.generate`` tok/s (engine already started);
``batch_over_offline_end_to_end`` = the same with each side's start-up included (run_batch's whole call vs
``LLM(...)`` + ``generate``). ``two_engines_over_one`` = steady (and end-to-end) tok/s of 2 engines / 1.
The JSON is rewritten after each step, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORK = Path("/tmp/llmray_bench_batch")


def shared_text() -> Path:
    root = Path(os.environ.get("LLMRAY_SHARED_DATA", REPO.parent / "shared" / "data"))
    for path in (root / "tinyshakespeare" / "input.txt", REPO / ".data" / "tinyshakespeare" / "input.txt"):
        if path.exists():
            return path
    raise SystemExit(f"no tinyshakespeare/input.txt under {root} or .data/ (set LLMRAY_SHARED_DATA)")


def make_model_dir(quick: bool, tokenizer_dir: Path, text: str) -> Path:
    """Random-weight Qwen3 directory: 0.6B shapes + the BPE tokenizer, or (quick) tiny + a char tokenizer."""
    from llmray.config import ModelConfig
    from llmray.model.checkpoint import save_model
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.model.tokenizer import Tokenizer, char_tokenizer

    if quick:
        cfg = ModelConfig.preset("tiny", max_position_embeddings=4096)
        tok = char_tokenizer(text)
    else:
        cfg = ModelConfig.preset("qwen3-0.6b")
        tok = Tokenizer.load(tokenizer_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise SystemExit(f"tokenizer {tokenizer_dir} has {tok.vocab_size} tokens, the model {cfg.vocab_size}")
    out = WORK / ("tiny-char" if quick else "qwen3-0.6b-bpe151k")
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = Qwen3ForCausalLM(cfg)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    save_model(model.to(dtype), out, tokenizer=tok, dtype=dtype)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def text_rows(text: str, n: int, lo: int, hi: int, max_tokens: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.randint(lo, hi)
        at = rng.randrange(0, len(text) - length)
        params = {"max_tokens": max_tokens, "temperature": 0.6, "ignore_eos": True}
        rows.append({"id": i, "prompt": text[at : at + length], "sampling_params": params})
    return rows


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(lo, hi))]
        params = {"max_tokens": rng.randint(lo, hi), "temperature": 0.6, "ignore_eos": True}
        rows.append({"id": i, "prompt_token_ids": prompt, "sampling_params": params})
    return rows


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def offline_child(args) -> None:
    """LLM.generate over the rows in its own process (start-up and generation timed apart); prints JSON."""
    from llmray.engine.llm import LLM
    from llmray.engine.sampling_params import SamplingParams

    rows = [json.loads(line) for line in Path(args.rows_file).read_text().splitlines()]
    t = time.perf_counter()
    llm = LLM(args.model_dir, **json.loads(args.engine))
    sync()
    startup = time.perf_counter() - t
    prompts = [r["prompt"] for r in rows]
    params = [SamplingParams(**r["sampling_params"]) for r in rows]
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    seconds = time.perf_counter() - t
    tokens = sum(len(o.token_ids) for o in outs)
    res = dict(engine_startup_s=startup, seconds=seconds, output_tokens=tokens, tok_per_s=tokens / seconds)
    res["tok_per_s_with_startup"] = tokens / (seconds + startup)
    res["prompt_tokens"] = sum(len(o.prompt_token_ids) for o in outs)
    print(json.dumps(res))


def gpu_memory_used() -> list[int]:
    """MiB in use on each GPU (nvidia-smi; empty when it cannot tell)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return [int(x) for x in out.split()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return []


def wait_gpus_free(baseline: list[int], limit_s: float = 20.0) -> float:
    """Wait until every GPU is back within 1 GiB of ``baseline`` (the last run's engines have exited)."""
    t = time.perf_counter()
    while time.perf_counter() - t < limit_s:
        used = gpu_memory_used()
        if len(used) != len(baseline) or all(u <= b + 1024 for u, b in zip(used, baseline, strict=True)):
            break
        time.sleep(0.5)
    return time.perf_counter() - t


def run_batch_timed(
    model_dir: Path, rows_path: Path, engine: dict, cuda: bool, engines: int, tag: str
) -> dict:
    """run_batch over the rows with ``engines`` engine actors; end-to-end time and each engine's timeline."""
    from llmray.batch.cli import run_batch

    out = WORK / f"out-{tag}-{time.time_ns()}"
    rows = sum(1 for _ in rows_path.open())
    shard_rows = max(8, min(256, rows // (8 * engines)))  # several shards (Ray Data tasks) per engine
    stats_dir = out / "_stats"
    t0 = time.time()
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
    )
    t_end = time.time()
    assert summary["errors"] == 0, summary
    seconds = t_end - t0
    res: dict = dict(
        engines=engines,
        rows=summary["rows"],
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
        engine_start=max(st["engine_ready"] - st["actor_start"] for st in stats),
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


def occupancy(args) -> dict:
    """The two actor designs on one in-process engine (tiny model, CPU), counted in engine steps (no timing
    noise): one continuous feed over all rows (the streaming actor) against ``generate_stream`` over one
    batch at a time (the synchronous actor, which drains at every batch's tail)."""
    from llmray.config import ModelConfig
    from llmray.engine.llm import LLM
    from llmray.engine.sampling_params import SamplingParams
    from llmray.model.qwen3 import Qwen3ForCausalLM

    cfg = ModelConfig.preset("tiny", max_position_embeddings=4096)
    torch.manual_seed(0)
    seqs = args.occ_seqs
    llm = LLM.from_model(Qwen3ForCausalLM(cfg, kernels="torch"), kernels="torch", max_num_seqs=seqs)
    rows = workload(args.occ_rows, 4, args.occ_max_len, cfg.vocab_size)
    reqs = [(r["id"], r["prompt_token_ids"], SamplingParams(**r["sampling_params"])) for r in rows]
    counts = {"steps": 0, "seqs": 0}
    step = llm.engine.step

    def counted():
        counts["steps"] += 1
        counts["seqs"] += len(llm.engine.scheduler.running)
        return step()

    llm.engine.step = counted
    res = {
        "rows": len(rows),
        "max_num_seqs": seqs,
        "prompt_and_output_lengths": f"uniform in [4, {args.occ_max_len}]",
    }
    sizes = [(f"sync_batch_{b}", b) for b in (seqs, 4 * seqs)]
    for name, size in [("streaming", len(reqs)), *sizes]:
        counts.update(steps=0, seqs=0)
        t = time.perf_counter()
        for i in range(0, len(reqs), size):
            for _ in llm.generate_stream(reqs[i : i + size]):
                pass
        res[name] = dict(
            engine_steps=counts["steps"],
            mean_running_seqs=counts["seqs"] / counts["steps"],
            seconds=time.perf_counter() - t,
        )
        print(name, res[name], flush=True)
    for name, _ in sizes:
        res[f"{name}_steps_over_streaming"] = res[name]["engine_steps"] / res["streaming"]["engine_steps"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--quick", action="store_true", help="tiny model, few rows, on CPU (checks the script)")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--min-chars", type=int, default=150)
    ap.add_argument("--max-chars", type=int, default=1500)
    ap.add_argument(
        "--engines", default=None, help="engine counts to run, e.g. 1,2 (default: 1, and 2 if 2 GPUs)"
    )
    ap.add_argument("--tokenizer-dir", default=str(REPO / ".data" / "bpe151k"))
    ap.add_argument("--occupancy", action="store_true", help="only the in-process step count of both designs")
    ap.add_argument("--occ-rows", type=int, default=256)
    ap.add_argument("--occ-seqs", type=int, default=32)
    ap.add_argument("--occ-max-len", type=int, default=48)
    ap.add_argument("--offline-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--rows-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.offline_child:
        return offline_child(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.occupancy:
        res = {"command": "python " + " ".join(sys.argv), "device": "cpu", **occupancy(args)}
        (out / "batch_occupancy_cpu.json").write_text(json.dumps(res, indent=2))
        return print(json.dumps(res, indent=2))
    if args.quick:
        args.rows, args.max_tokens, args.min_chars, args.max_chars = min(args.rows, 64), 16, 20, 120
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    counts = [int(c) for c in args.engines.split(",")] if args.engines else [1] + ([2] if gpus >= 2 else [])
    WORK.mkdir(parents=True, exist_ok=True)
    text = shared_text().read_text()
    t = time.perf_counter()
    model_dir = make_model_dir(args.quick, Path(args.tokenizer_dir), text)
    model_s = time.perf_counter() - t
    rows = text_rows(text, args.rows, args.min_chars, args.max_chars, args.max_tokens)
    rows_path = WORK / f"rows-{args.rows}-{args.min_chars}-{args.max_chars}-{args.max_tokens}.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    engine = dict(max_num_seqs=256, max_num_batched_tokens=8192) if cuda else dict(max_model_len=512)
    res: dict = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "gpus_visible": gpus,
        "model": "tiny preset, char tokenizer"
        if args.quick
        else "qwen3-0.6b shapes, random bf16 weights, 151,936-token BPE",
        "rows": args.rows,
        "workload": (
            f"tinyshakespeare passages of {args.min_chars}-{args.max_chars} characters as text prompts, "
            f"max_tokens {args.max_tokens}, temperature 0.6, ignore_eos"
        ),
        "engine": engine,
        "model_dir_write_s": model_s,
    }

    def save() -> None:
        (out / "batch.json").write_text(json.dumps(res, indent=2))

    print(time.strftime("%H:%M:%S"), "offline LLM.generate ...", flush=True)
    child = [sys.executable, __file__, "--offline-child", "--model-dir", str(model_dir)]
    child += ["--rows-file", str(rows_path), "--engine", json.dumps(engine)]
    proc = subprocess.run(child, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"offline child failed:\n{proc.stderr[-4000:]}")
    offline = json.loads(proc.stdout.strip().splitlines()[-1])
    res["offline_llm_generate"] = offline
    res["prompt_tokens"] = offline["prompt_tokens"]
    save()
    print(json.dumps(offline), flush=True)
    import ray

    t = time.perf_counter()
    ray.init(configure_logging=False, log_to_driver=False, include_dashboard=False)
    res["ray_init_s"] = time.perf_counter() - t
    baseline = gpu_memory_used() if cuda else []
    for i, n in enumerate(counts):
        if cuda and n > gpus:
            res[f"llmray_batch_{n}_engines"] = f"skipped: {gpus} GPU(s) visible"
            continue
        if cuda and i:
            res[f"gpu_free_wait_s_before_{n}"] = wait_gpus_free(baseline)
        print(time.strftime("%H:%M:%S"), f"llmray batch, {n} engine(s) ...", flush=True)
        b = run_batch_timed(model_dir, rows_path, engine, cuda, n, f"{n}-engines")
        if b["output_tokens"] != offline["output_tokens"]:
            b["error"] = f"{b['output_tokens']} output tokens, LLM.generate {offline['output_tokens']}"
        key = "llmray_batch_streaming" if n == 1 else f"llmray_batch_{n}_engines"
        res[key] = b
        if n == 1 and "steady" in b:
            res["batch_over_offline"] = b["steady"]["tok_per_s"] / offline["tok_per_s"]
            res["batch_over_offline_end_to_end"] = (
                b["tok_per_s_end_to_end"] / offline["tok_per_s_with_startup"]
            )
        one = res.get("llmray_batch_streaming")
        if n == 2 and isinstance(one, dict) and "steady" in b and "steady" in one:
            res["two_engines_over_one"] = b["steady"]["tok_per_s"] / one["steady"]["tok_per_s"]
            res["two_engines_over_one_end_to_end"] = b["tok_per_s_end_to_end"] / one["tok_per_s_end_to_end"]
        save()
        print(json.dumps(b), flush=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
