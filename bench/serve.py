"""Serving at engine speed: offline ``LLM``, ``AsyncLLM`` and HTTP through ``llmray serve``, on identical requests.

One run: (1) start-up: ``llmray serve`` launched as a user would (a subprocess) with an empty Triton cache
(cold) and again with the cache it left (warm), each timed from launch to its first answered request; the
warm server stays up for (3). Then for each mix (``--mixes``, prompt/output tokens, ``ignore_eos``, greedy,
random token-id prompts) and each concurrency, on the same requests and back to back:
(2a) offline ``LLM.generate_stream(..., max_in_flight=c)``, (2b) ``AsyncLLM`` (its engine core in its own
process) driven by ``c`` asyncio clients in this process, (3) HTTP: streamed ``/v1/completions`` from
``--client-procs`` client processes. Reported: output tok/s, TTFT p50/p99, TPOT p50/p99, and per mix
``http_vs_offline`` / ``async_vs_offline`` (the 128/128 mix's ``http_vs_offline`` also at the top level).
Without ``--model`` a random-weight Qwen3-0.6B (bf16) with a char tokenizer over its whole vocabulary is
written first.

    python bench/serve.py --out bench/results/serve.json                                             # GPU
    python bench/serve.py --model DIR --mixes 16/16 --concurrency 64 --requests 64:192 --cpu --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serve_client import run_http_level, summarize, warm_pool  # noqa: E402


def write_random_qwen3(out: Path) -> Path:
    """Random-weight Qwen3-0.6B in bf16 with a char tokenizer of exactly vocab_size tokens."""
    import torch

    from llmray.config import ModelConfig
    from llmray.model.checkpoint import save_model
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.model.tokenizer import SPECIAL_TOKENS, char_tokenizer

    if (out / "config.json").exists():
        return out
    base = ModelConfig.preset("qwen3-0.6b")
    n_chars = base.vocab_size - len(SPECIAL_TOKENS)
    cps = [c for c in range(0x4E00, 0x4E00 + n_chars + 2048) if not 0xD800 <= c <= 0xDFFF][:n_chars]
    tok = char_tokenizer("".join(map(chr, cps)), base_chars="")  # exactly the model vocabulary
    assert tok.vocab_size == base.vocab_size, tok.vocab_size
    cfg = base.replace(eos_token_id=tok.eos_token_id, bos_token_id=None, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(cfg, kernels="torch")
    save_model(model, out, tokenizer=tok, dtype=torch.bfloat16)
    return out


def make_prompts(n: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)  # distinct prompts: no prefix-cache hits between requests
    return [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(n)]


# --- llmray serve as a subprocess ------------------------------------------------------------------
def _first_answer(url: str, model: str) -> bool:
    body = json.dumps({"model": model, "prompt": [1, 2, 3], "max_tokens": 2}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except Exception:
        return False


STARTUP: dict[str, list] = {}  # per launch: when `llmray serve` printed "serving on", when it first answered


def launch_serve(
    flags: list[str], port: int, env: dict[str, str], log: Path
) -> tuple[subprocess.Popen, float]:
    """Start ``llmray serve``; return the process and the seconds from launch to its first answer. Requests
    are sent once it prints "serving on" (before that a request only waits in a proxy without a replica)."""
    return wait_serve(start_serve(flags, port, env, log), port, log)


def start_serve(
    flags: list[str], port: int, env: dict[str, str], log: Path
) -> tuple[subprocess.Popen, float]:
    cmd = [sys.executable, "-m", "llmray.cli", "serve", "--port", str(port), *flags]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    # its process group, for a job script that must stop it after killing this bench (a time limit)
    log.with_suffix(".pid").write_text(str(proc.pid))
    return proc, t0


def wait_serve(
    started: tuple[subprocess.Popen, float], port: int, log: Path
) -> tuple[subprocess.Popen, float]:
    """Wait for the first answer of a server ``start_serve`` launched."""
    proc, t0 = started
    url = f"http://127.0.0.1:{port}"
    deployed = None
    while deployed is None or not _first_answer(url, "bench"):
        if deployed is None and "llmray: serving on" in log.read_text(errors="replace"):
            deployed = time.monotonic() - t0
        if proc.poll() is not None:
            raise RuntimeError(
                f"llmray serve exited ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() - t0 > 600:
            raise RuntimeError(f"llmray serve did not answer within 600 s; see {log}")
        time.sleep(0.1 if deployed is None else 0.05)
    total = time.monotonic() - t0
    STARTUP.setdefault(log.stem, []).append(
        {"deployed_s": round(deployed, 1), "first_answer_s": round(total, 1)}
    )
    return proc, total


def stop_serve(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- offline and AsyncLLM ---------------------------------------------------------------------------
def load_engines(a: Any, model_dir: Path, kw: dict[str, Any], paced: bool) -> tuple[Any, Any]:
    """The offline ``LLM`` (None with the paced double) and the ``AsyncLLM`` the levels compare with."""
    from llmray.engine.llm import LLM, AsyncLLM

    if paced:  # the reference: AsyncLLM over the same double, in this process
        from _support.paced_engine import PacedAsyncLLM

        return None, PacedAsyncLLM(str(model_dir), step_ms=a.paced_step_ms, **kw)
    offline = LLM(model_dir, **kw)
    wants_async = not a.skip_async or bool(a.async_levels)
    return offline, AsyncLLM(model_dir, **kw) if wants_async else None


def run_offline(llm: Any, prompts: list[list[int]], conc: int, max_tokens: int) -> dict[str, Any]:
    from llmray.engine.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    t0 = time.monotonic()
    tokens = sum(len(o.token_ids) for o in llm.generate_stream(enumerate(prompts), sp, max_in_flight=conc))
    wall = time.monotonic() - t0
    return {"requests": len(prompts), "output_tokens": tokens, "output_tok_per_s": round(tokens / wall, 1),
            "wall_s": round(wall, 3)}  # fmt: skip


async def _async_level(llm: Any, prompts: list[list[int]], conc: int, max_tokens: int) -> dict[str, Any]:
    from llmray.engine.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    sem = asyncio.Semaphore(conc)

    async def one(p: list[int]) -> dict:
        async with sem:
            t0 = time.monotonic()
            ttft, tokens = None, 0
            async for out in llm.generate_stream(p, sp, interval_s=0.0):
                if ttft is None and out.new_token_ids:
                    ttft = time.monotonic() - t0
                tokens = len(out.token_ids)
            end = time.monotonic()
            return {"ttft": ttft, "tokens": tokens, "e2e": end - t0, "start": t0, "end": end, "error": None}

    return summarize(list(await asyncio.gather(*(one(p) for p in prompts))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir (default: write a random-weight Qwen3-0.6B to --model-out)")
    ap.add_argument("--model-out", default="/tmp/llmray-qwen3-0.6b-random")
    ap.add_argument("--mixes", default="128/128,1024/128", help="prompt/output token pairs")
    ap.add_argument("--concurrency", default="1,16,64,256,512")
    ap.add_argument("--requests", default="1:16,16:64,64:256,256:2048,512:2048",
                    help="requests per level, conc:n pairs (the second mix runs half as many)")  # fmt: skip
    ap.add_argument(
        "--engine-kwargs", default='{"max_num_seqs": 256, "max_model_len": 2048, "num_kv_blocks": 8192}'
    )
    ap.add_argument("--ingress-replicas", type=int, default=2)
    ap.add_argument("--stream-interval-ms", type=float, default=20.0)
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--skip-startup", action="store_true", help="one launch only (not timed cold/warm)")
    ap.add_argument("--startup-only", action="store_true", help="the cold and warm launches only, no levels")
    ap.add_argument("--cpu", action="store_true", help="no GPU: the server runs its engine on the CPU")
    ap.add_argument("--serve-env", action="append", default=[], metavar="KEY=VAL",
                    help="environment of the llmray serve process (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1)")  # fmt: skip
    ap.add_argument("--serve-flags", default="", help="extra llmray serve flags, e.g. '--engine mock'")
    ap.add_argument(
        "--prompt-vocab", type=int, default=0, help="prompt token ids below this (default: the model's)"
    )
    ap.add_argument("--http-only", action="store_true", help="HTTP only (no offline / AsyncLLM comparison)")
    ap.add_argument("--skip-async", action="store_true", help="no AsyncLLM in-process level (offline + HTTP)")
    ap.add_argument("--async-levels", default="",
                    help="with --skip-async: run AsyncLLM at these concurrencies only (e.g. 1: the engine's TTFT)")  # fmt: skip
    ap.add_argument("--log-dir", default=None, help="keep the llmray serve logs here (default: a temp dir)")
    ap.add_argument(
        "--triton-cache", default=None, help="TRITON_CACHE_DIR to use (default: a new, empty one)"
    )
    ap.add_argument("--paced-step-ms", type=float, default=None,
                    help="no model: the engine core runs tests/_support/paced_engine.py (a step of this many ms "
                    "gives every running request a token), so HTTP is measured against AsyncLLM on the same "
                    "double: the serving stack's own ceiling (CPU)")  # fmt: skip
    ap.add_argument(
        "--deadline-s", type=float, default=0, help="start no new level after this long (0 = none)"
    )
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each level (HTTP, then offline) this many times; the runs after the first go "
                    "to the mix's 'repeats' (the offline baseline itself varies between runs)")  # fmt: skip
    ap.add_argument("--out", default="bench/results/serve.json")
    a = ap.parse_args()

    import torch

    t_start = time.monotonic()
    levels = [int(c) for c in a.concurrency.split(",")]
    counts = {int(k): int(v) for k, v in (p.split(":") for p in a.requests.split(","))}
    mixes = [tuple(int(x) for x in m.split("/")) for m in a.mixes.split(",")]
    kw = json.loads(a.engine_kwargs)
    paced = a.paced_step_ms is not None
    if paced:
        sys.path.insert(0, str(REPO / "tests"))
        from _support.paced_engine import write_tokenizer_dir

        model_dir = write_tokenizer_dir(Path(tempfile.gettempdir()) / "llmray-paced-tokenizer")
    else:
        model_dir = Path(a.model) if a.model else write_random_qwen3(Path(a.model_out))
    from llmray.model.tokenizer import Tokenizer

    vocab = (
        a.prompt_vocab or Tokenizer.load(model_dir).vocab_size - 3
    )  # plain tokens (the last 3 are special)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "bench": "serve", "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": f"paced engine double, {a.paced_step_ms} ms per step" if paced
        else str(model_dir) if a.model else "qwen3-0.6b random weights, bf16",
        "engine_kwargs": kw, "ingress_replicas": a.ingress_replicas, "stream_interval_ms": a.stream_interval_ms,
        "client_procs": a.client_procs, "http_vs_offline": {}, "startup_s": {}, "mixes": {},
    }  # fmt: skip

    def save() -> None:
        out.write_text(json.dumps(result, indent=2))

    # (1) llmray serve, launched as a user would; cold = empty Triton cache, warm = the cache it left
    port = 8000 + os.getpid() % 1000
    flags = ["--model", str(model_dir), "--served-model-name", "bench", "--max-queued-requests", "-1",
             "--ingress-replicas", str(a.ingress_replicas), "--stream-interval-ms", str(a.stream_interval_ms)]  # fmt: skip
    flags += [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    flags += ["--no-use-gpu"] if a.cpu else []
    # this process's engines and the server share it; empty (a cold start) unless --triton-cache names a
    # directory an earlier run filled
    os.environ["TRITON_CACHE_DIR"] = a.triton_cache or tempfile.mkdtemp(prefix="triton-cold-")
    env = dict(os.environ, **dict(kv.split("=", 1) for kv in a.serve_env))
    if paced:
        flags += ["--engine-factory", "_support.paced_engine:PacedAsyncLLM"]
        env["LLMRAY_PACED_STEP_MS"] = str(a.paced_step_ms)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")])
    flags += a.serve_flags.split()
    result["serve_env"], result["serve_flags"] = a.serve_env, a.serve_flags
    logs = Path(a.log_dir) if a.log_dir else Path(tempfile.mkdtemp(prefix="llmray-serve-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    if not a.skip_startup:
        proc, cold = launch_serve(flags, port, env, logs / "cold.log")
        result["startup_s"]["cold"] = round(cold, 1)
        stop_serve(proc)
    if a.startup_only:  # cold (above), then warm unless the deadline says no
        if not a.deadline_s or time.monotonic() - t_start < a.deadline_s:
            proc, warm = launch_serve(flags, port, env, logs / "warm.log")
            result["startup_s"]["warm"] = round(warm, 1)
            stop_serve(proc)
        result["startup_detail"], result["total_s"] = STARTUP, round(time.monotonic() - t_start, 1)
        save()
        print(json.dumps({"startup_s": result["startup_s"], "detail": STARTUP}), flush=True)
        return 0
    # with --skip-startup the server starts while this process loads its own engines (levels only: the
    # start-up time is then not the figure, and is filed as "first_overlapped")
    overlap = a.skip_startup and not a.http_only
    started = start_serve(flags, port, env, logs / "warm.log")
    offline, aengine = load_engines(a, model_dir, kw, paced) if overlap else (None, None)
    proc, warm = wait_serve(started, port, logs / "warm.log")
    if not overlap and not a.http_only:
        offline, aengine = load_engines(a, model_dir, kw, paced)
    key = "warm" if not a.skip_startup else "first_overlapped" if overlap else "first"
    result["startup_s"][key] = round(warm, 1)
    result["startup_detail"] = STARTUP
    print(json.dumps({"startup_s": result["startup_s"], "detail": STARTUP}), flush=True)
    save()
    url = f"http://127.0.0.1:{port}"

    pool = ProcessPoolExecutor(a.client_procs, mp_context=mp.get_context("spawn"))
    try:
        warm_pool(pool, a.client_procs)
        warmup = make_prompts(32, 16, vocab, seed=999)
        async_levels = {int(c) for c in a.async_levels.split(",") if c}
        if offline is not None:
            run_offline(offline, warmup, 32, 16)
        if aengine is not None:
            asyncio.run(_async_level(aengine, warmup, 32, 16))
        run_http_level(pool, a.client_procs, url, "bench", warmup, 32, 16)
        for m_i, (plen, olen) in enumerate(mixes):
            mix = result["mixes"].setdefault(f"{plen}/{olen}", {"offline": {}, "async_llm": {}, "http": {}})
            for c, rep in ((c, r) for c in levels for r in range(a.repeat)):
                measured = any(m["http"] for m in result["mixes"].values())  # the first level runs regardless
                if a.deadline_s and time.monotonic() - t_start > a.deadline_s and measured:
                    result.setdefault("skipped_for_time", []).append(
                        f"{plen}/{olen}@{c}" + f"#{rep}" * (rep > 0)
                    )
                    continue
                n = counts.get(c, max(c, 8)) // (1 if m_i == 0 else 2)
                # a repeat gets prompts of its own: the first run's would hit both engines' prefix caches
                prompts = make_prompts(max(n, 1), plen, vocab, seed=1000 * m_i + c + 100_000 * rep)
                k = str(c)
                if rep > 0:  # the same level again: HTTP and offline back to back
                    again = {"http": run_http_level(pool, a.client_procs, url, "bench", prompts, c, olen)}
                    if offline is not None and not a.http_only:
                        again["offline"] = run_offline(offline, prompts, c, olen)
                        again["http_vs_offline"] = round(
                            again["http"]["output_tok_per_s"] / again["offline"]["output_tok_per_s"], 3
                        )
                    mix.setdefault("repeats", {}).setdefault(k, []).append(again)
                    print(json.dumps({"mix": f"{plen}/{olen}", "c": c, "repeat": rep, **again}), flush=True)
                    save()
                    continue
                mix["http"][k] = run_http_level(pool, a.client_procs, url, "bench", prompts, c, olen)
                if a.http_only:
                    print(json.dumps({"mix": f"{plen}/{olen}", "c": c, "http": mix["http"][k]}), flush=True)
                    save()
                    continue
                if paced:
                    mix["async_llm"][k] = asyncio.run(_async_level(aengine, prompts, c, olen))
                    ratio = mix["http"][k]["output_tok_per_s"] / mix["async_llm"][k]["output_tok_per_s"]
                    mix.setdefault("http_vs_async", {})[k] = round(ratio, 3)
                    print(json.dumps({"mix": f"{plen}/{olen}", "c": c, "http_vs_async": round(ratio, 3),
                                      "async": mix["async_llm"][k], "http": mix["http"][k]}), flush=True)  # fmt: skip
                    save()
                    continue
                mix["offline"][k] = run_offline(offline, prompts, c, olen)
                off = mix["offline"][k]["output_tok_per_s"]
                mix.setdefault("http_vs_offline", {})[k] = round(mix["http"][k]["output_tok_per_s"] / off, 3)
                if not a.skip_async or c in async_levels:
                    mix["async_llm"][k] = asyncio.run(_async_level(aengine, prompts, c, olen))
                    mix.setdefault("async_vs_offline", {})[k] = round(
                        mix["async_llm"][k]["output_tok_per_s"] / off, 3
                    )
                if m_i == 0:
                    result["http_vs_offline"][k] = mix["http_vs_offline"][k]
                print(json.dumps({"mix": f"{plen}/{olen}", "c": c, "offline": off, "async": mix["async_llm"].get(k),
                                  "http": mix["http"][k]}), flush=True)  # fmt: skip
                result["total_s"] = round(time.monotonic() - t_start, 1)
                save()
        if aengine is not None:
            aengine.shutdown()
    finally:
        pool.shutdown(cancel_futures=True)
        stop_serve(proc)
    result["total_s"] = round(time.monotonic() - t_start, 1)
    save()
    print(json.dumps({k: result[k] for k in ("http_vs_offline", "startup_s", "total_s")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
