"""``llmray batch`` (Ray Data, one engine actor) against ``LLM.generate`` on the same rows, same machine.

    python bench/batch.py --out bench/results                 # GPU: Qwen3-0.6B shapes (about 1.5 minutes)
    python bench/batch.py --quick --compare-sync --out /tmp/b  # tiny model on CPU; also the synchronous actor
    python bench/batch.py --occupancy                          # CPU: engine steps, streaming vs synchronous actor

Rows follow the nano-vllm workload: prompt and output lengths uniform in [100, 1024] (seed 0), random
token ids as ``prompt_token_ids``, temperature 0.6, ignore_eos. The model directory (random bf16 weights,
a 151,936-entry word-level tokenizer so every id detokenizes) is written under /tmp. ``LLM.generate`` runs
in a child process (engine started and warmed up first, then timed); ``llmray batch`` (``run_batch``) runs
in this process on a local Ray, timed from start to the last shard written, so its time includes Ray Data
start, the actor's start, model load, KV sizing and graph capture. A one-row run of the same pipeline
(one 1-token row) is timed first and reported beside it, for information only: subtracting it from the full
run is not valid (on the H200 the one-row run took 18.4 s and the 256-row run 18.7 s: start-up costs differ
between the two runs), so ``batch_over_offline`` is the end-to-end ratio, start-up included; with 256 rows
it is dominated by that start-up, and rows in the thousands are needed to see the steady state. Writes
batch.json.

"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORK = Path("/tmp/llmray_bench_batch")


def make_model_dir(quick: bool) -> Path:
    """Random-weight Qwen3 directory with a word-level tokenizer covering the whole vocabulary."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from llmray.config import ModelConfig
    from llmray.model.checkpoint import save_model
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.model.tokenizer import Tokenizer

    cfg = (
        ModelConfig.preset("tiny", max_position_embeddings=4096)
        if quick
        else ModelConfig.preset("qwen3-0.6b")
    )
    out = WORK / ("tiny" if quick else "qwen3-0.6b-random")
    if (out / "config.json").exists():
        return out
    vocab = {f"t{i}": i for i in range(cfg.vocab_size - 1)} | {"<unk>": cfg.vocab_size - 1}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = Qwen3ForCausalLM(cfg)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    save_model(model.to(dtype), out, tokenizer=Tokenizer(backend, {"model_max_length": 40960}), dtype=dtype)
    return out


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
    """LLM.generate over the rows (after start-up and a warm-up), in its own process; prints JSON."""
    from llmray.engine.llm import LLM
    from llmray.engine.sampling_params import SamplingParams

    rows = [json.loads(line) for line in Path(args.rows_file).read_text().splitlines()]
    t = time.perf_counter()
    llm = LLM(args.model_dir, **json.loads(args.engine))
    sync()
    startup = time.perf_counter() - t
    prompts = [r["prompt_token_ids"] for r in rows]
    params = [SamplingParams(**r["sampling_params"]) for r in rows]
    warm = min(len(rows), 32)
    llm.generate(prompts[:warm], [SamplingParams(max_tokens=8, ignore_eos=True)] * warm)
    sync()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    seconds = time.perf_counter() - t
    tokens = sum(len(o.token_ids) for o in outs)
    print(
        json.dumps(
            dict(seconds=seconds, output_tokens=tokens, tok_per_s=tokens / seconds, engine_startup_s=startup)
        )
    )


def run_batch_timed(
    model_dir: Path, rows_path: Path, engine: dict, cuda: bool, streaming: bool, tag: str
) -> dict:
    from llmray.batch.cli import run_batch

    out = WORK / f"out-{tag}-{time.time_ns()}"
    t = time.perf_counter()
    summary = run_batch(
        str(model_dir),
        str(rows_path),
        str(out),
        use_gpu=cuda,
        engine_kwargs=engine,
        batch_size=64,
        shard_rows=256,
        streaming=streaming,
        progress=True,
    )
    seconds = time.perf_counter() - t
    assert summary["errors"] == 0, summary
    return dict(seconds_end_to_end=seconds, output_tokens=summary["tokens"], rows=summary["rows"])


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
    ap.add_argument("--quick", action="store_true", help="tiny model and workload on CPU (checks the script)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--compare-sync", action="store_true", help="also run the synchronous actor")
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
    if args.occupancy:
        res = {"command": "python " + " ".join(sys.argv), "device": "cpu", **occupancy(args)}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "batch_occupancy_cpu.json").write_text(json.dumps(res, indent=2))
        return print(json.dumps(res, indent=2))
    if args.quick:
        args.rows, args.min_len, args.max_len = min(args.rows, 64), 8, 48
    cuda = torch.cuda.is_available()
    WORK.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model_dir = make_model_dir(args.quick)
    model_s = time.perf_counter() - t
    from llmray.config import ModelConfig

    vocab = ModelConfig.preset("tiny" if args.quick else "qwen3-0.6b").vocab_size
    rows = workload(args.rows, args.min_len, args.max_len, vocab)
    rows_path = WORK / f"rows-{args.rows}-{args.min_len}-{args.max_len}.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    engine = dict(max_num_seqs=256, max_num_batched_tokens=8192) if cuda else dict(max_model_len=256)
    res: dict = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": "tiny preset" if args.quick else "qwen3-0.6b shapes, random bf16 weights",
        "rows": args.rows,
        "workload": f"nano-vllm shape: prompt and output lengths uniform in [{args.min_len}, {args.max_len}]",
        "engine": engine,
        "model_dir_write_s": model_s,
    }
    child = [sys.executable, __file__, "--offline-child", "--model-dir", str(model_dir)]
    child += ["--rows-file", str(rows_path), "--engine", json.dumps(engine)]
    proc = subprocess.run(child, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"offline child failed:\n{proc.stderr[-4000:]}")
    offline = json.loads(proc.stdout.strip().splitlines()[-1])
    res["offline_llm_generate"] = offline
    import ray

    ray.init(configure_logging=False, log_to_driver=False, include_dashboard=False)
    one = WORK / "one-row.jsonl"
    one.write_text(json.dumps({**rows[0], "sampling_params": {"max_tokens": 1}}) + "\n")
    startup = run_batch_timed(model_dir, one, engine, cuda, True, "one-row")["seconds_end_to_end"]
    res["one_row_pipeline_s (Ray Data + actor start + model load + KV sizing + graphs)"] = startup
    variants = [("streaming", True)] + ([("sync", False)] if args.compare_sync else [])
    for name, streaming in variants:
        b = run_batch_timed(model_dir, rows_path, engine, cuda, streaming, name)
        assert b["output_tokens"] == offline["output_tokens"], (b, offline)
        b["tok_per_s_end_to_end"] = b["output_tokens"] / b["seconds_end_to_end"]
        res[f"llmray_batch_{name}"] = b
        if name == "streaming":  # end to end, pipeline start-up included (see the module docstring)
            res["batch_over_offline"] = b["tok_per_s_end_to_end"] / offline["tok_per_s"]
        else:
            res["sync_over_streaming_end_to_end"] = (
                b["tok_per_s_end_to_end"] / res["llmray_batch_streaming"]["tok_per_s_end_to_end"]
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
