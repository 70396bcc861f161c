"""Serving latency: the OpenAI API through HTTP + Ray Serve, next to the same workload on ``AsyncLLM`` directly.

At each concurrency (default 1, 16, 64, 256) the same requests (random token-id prompts of ``--prompt-len``,
``--max-tokens`` new tokens, ``ignore_eos``) run (a) as streamed ``/v1/completions`` through the Serve app
(proxy → FastAPI ingress → LLMServer replica → engine) and (b) on an in-process ``AsyncLLM``. Reported per
level: TTFT p50/p99, inter-token latency p50/p99 (gaps between streamed chunks, spread over the tokens in
each chunk), time per output token (TPOT) p50, end-to-end p50, output tokens/s; plus the end-to-end time of
one 50-token request. Without ``--model`` it writes a random-weight Qwen3-0.6B (bf16) with a char-level
tokenizer covering the whole 151,936-token vocabulary (every sampled id decodes to one character).

    python bench/serve.py --out bench/results/serve.json                          # GPU
    python bench/serve.py --model DIR --concurrency 1,4 --max-tokens 16 --prompt-len 8 --out /tmp/s.json  # CPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmray.config import ModelConfig  # noqa: E402


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def write_random_qwen3(out: Path) -> Path:
    """Random-weight Qwen3-0.6B in bf16 with a char tokenizer of exactly vocab_size tokens."""
    from llmray.model.checkpoint import save_model
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.model.tokenizer import SPECIAL_TOKENS, char_tokenizer

    if (out / "config.json").exists():
        return out
    base = ModelConfig.preset("qwen3-0.6b")
    n_chars = base.vocab_size - len(SPECIAL_TOKENS)
    cps = [c for c in range(0x4E00, 0x4E00 + n_chars + 2048) if not 0xD800 <= c <= 0xDFFF][:n_chars]
    tok = char_tokenizer("".join(map(chr, cps)), base_chars="")
    assert tok.vocab_size == base.vocab_size, tok.vocab_size
    cfg = base.replace(eos_token_id=tok.eos_token_id, bos_token_id=None, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(cfg, kernels="torch")
    save_model(model, out, tokenizer=tok, dtype=torch.bfloat16)
    del model
    return out


def make_prompts(n: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)  # distinct prompts: no prefix-cache hits between requests
    return [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(n)]


def summarize(records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    ttft = [r["ttft"] for r in records if r["ttft"] is not None]
    itl = [g for r in records for g in r["gaps"]]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1 and r["ttft"]]
    tokens = sum(r["tokens"] for r in records)
    ms = lambda x: None if x is None else round(1000 * x, 3)  # noqa: E731
    return {
        "requests": len(records),
        "ttft_ms_p50": ms(pct(ttft, 50)),
        "ttft_ms_p99": ms(pct(ttft, 99)),
        "itl_ms_p50": ms(pct(itl, 50)),
        "itl_ms_p99": ms(pct(itl, 99)),
        "tpot_ms_p50": ms(pct(tpot, 50)),
        "e2e_ms_p50": ms(pct([r["e2e"] for r in records], 50)),
        "output_tokens": tokens,
        "output_tok_per_s": round(tokens / wall_s, 1),
        "wall_s": round(wall_s, 3),
    }


# --- (a) through HTTP + Serve ------------------------------------------------------------------------
async def http_request(session, url: str, model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    last, ttft, gaps, tokens = None, None, [], 0
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if not chunk.get("choices") or not chunk["choices"][0]["text"]:
                continue
            now = time.perf_counter()
            k = max(1, len(chunk["choices"][0]["text"]))  # char tokenizer: one character per token
            if last is None:
                ttft = now - t0
            else:
                gaps.extend([(now - last) / k] * k)
            last = now
    return {"ttft": ttft, "gaps": gaps, "tokens": tokens, "e2e": time.perf_counter() - t0}


async def run_http_level(url: str, model: str, prompts: list[list[int]], conc: int, max_tokens: int) -> dict:
    import aiohttp

    sem = asyncio.Semaphore(conc)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def one(p: list[int]) -> dict:
            async with sem:
                return await http_request(session, url, model, p, max_tokens)

        t0 = time.perf_counter()
        records = await asyncio.gather(*(one(p) for p in prompts))
        return summarize(list(records), time.perf_counter() - t0)


async def http_e2e_50(url: str, model: str, prompt: list[int], repeats: int = 5) -> float:
    import aiohttp

    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(repeats):
            body = {"model": model, "prompt": prompt, "max_tokens": 50, "ignore_eos": True, "temperature": 0}
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                out = await resp.json()
            assert out["usage"]["completion_tokens"] == 50, out
            times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 3)


# --- (b) AsyncLLM directly ---------------------------------------------------------------------------
async def direct_request(llm, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    from llmray.engine.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    t0 = time.perf_counter()
    last, ttft, gaps, tokens = None, None, [], 0
    async for out in llm.generate_stream(prompt, sp):
        k = len(out.new_token_ids)
        tokens = len(out.token_ids)
        if not k:
            continue
        now = time.perf_counter()
        if last is None:
            ttft = now - t0
        else:
            gaps.extend([(now - last) / k] * k)
        last = now
    return {"ttft": ttft, "gaps": gaps, "tokens": tokens, "e2e": time.perf_counter() - t0}


async def run_direct_level(llm, prompts: list[list[int]], conc: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(conc)

    async def one(p: list[int]) -> dict:
        async with sem:
            return await direct_request(llm, p, max_tokens)

    t0 = time.perf_counter()
    records = await asyncio.gather(*(one(p) for p in prompts))
    return summarize(list(records), time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir (default: write a random-weight Qwen3-0.6B to --model-out)")
    ap.add_argument("--model-out", default="/tmp/llmray-qwen3-0.6b-random")
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: max(conc, 8))")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--engine-kwargs", default='{"max_num_seqs": 256, "max_model_len": 4096, "num_kv_blocks": 8192}'
    )
    ap.add_argument("--ingress-replicas", type=int, default=2)
    ap.add_argument("--skip-direct", action="store_true")
    ap.add_argument("--stream-interval-ms", type=float, default=20.0, help="LLMServer token batching")
    ap.add_argument("--out", default="bench/results/serve.json")
    a = ap.parse_args()

    levels = [int(c) for c in a.concurrency.split(",")]
    engine_kwargs = json.loads(a.engine_kwargs)
    t_start = time.time()
    model_dir = Path(a.model) if a.model else write_random_qwen3(Path(a.model_out))
    from llmray.model.tokenizer import Tokenizer

    vocab = Tokenizer.load(model_dir).vocab_size - 3  # plain tokens only (the last three are special)
    result: dict[str, Any] = {
        "bench": "serve",
        "command": "python " + " ".join(sys.argv),
        "stream_interval_ms": a.stream_interval_ms,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": str(model_dir) if a.model else "qwen3-0.6b random weights, bf16",
        "prompt_len": a.prompt_len,
        "max_tokens": a.max_tokens,
        "engine_kwargs": engine_kwargs,
        "ingress_replicas": a.ingress_replicas,
        "serve": {},
        "direct": {},
        "setup_s": round(time.time() - t_start, 1),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        s, d = result["serve"], result["direct"]
        cmp = {}
        for c in map(str, levels):
            if c in s and c in d:
                cmp[c] = {
                    "ttft_p50_added_ms": round(s[c]["ttft_ms_p50"] - d[c]["ttft_ms_p50"], 3),
                    "throughput_ratio": round(s[c]["output_tok_per_s"] / d[c]["output_tok_per_s"], 3),
                }
        result["serve_vs_direct"] = cmp
        out.write_text(json.dumps(result, indent=2))

    prompts = {c: make_prompts(a.requests or max(c, 8), a.prompt_len, vocab, seed=c) for c in levels}
    warm = make_prompts(8, a.prompt_len, vocab, seed=999)

    # Both engines stay up (KV cache sized by num_kv_blocks, so they share the GPU); the levels alternate
    # HTTP+Serve then direct, so each pair is measured back to back and partial runs still compare.
    import ray
    from ray import serve

    from llmray.engine.llm import AsyncLLM
    from llmray.engine.sampling_params import SamplingParams
    from llmray.serve.app import build_app

    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = {"model": str(model_dir), "served_model_name": "bench", "engine_kwargs": engine_kwargs,
                "ingress_replicas": a.ingress_replicas, "max_queued_requests": -1, "ingress_num_cpus": 1,
                "stream_interval_ms": a.stream_interval_ms}  # fmt: skip
    t0 = time.time()
    serve.run(build_app(app_args), name="llmray", route_prefix="/")
    result["serve_startup_s"] = round(time.time() - t0, 1)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    llm = None if a.skip_direct else AsyncLLM(str(model_dir), **engine_kwargs)
    result["direct_startup_s"] = round(time.time() - t0, 1)

    async def direct_e2e_50() -> float:
        times = []
        for _ in range(5):
            t1 = time.perf_counter()
            sp = SamplingParams(max_tokens=50, ignore_eos=True, temperature=0.0)
            async for _o in llm.generate_stream(warm[0], sp):
                pass
            times.append(time.perf_counter() - t1)
        return round(1000 * statistics.median(times), 3)

    async def run_all() -> None:
        await run_http_level(url, "bench", warm, 8, 16)
        result["serve_e2e_50_tokens_ms"] = await http_e2e_50(url, "bench", warm[0])
        if llm is not None:
            await run_direct_level(llm, warm, 8, 16)
            result["direct_e2e_50_tokens_ms"] = await direct_e2e_50()
        save()
        for c in levels:
            result["serve"][str(c)] = await run_http_level(url, "bench", prompts[c], c, a.max_tokens)
            print(json.dumps({"serve": c, **result["serve"][str(c)]}), flush=True)
            if llm is not None:
                result["direct"][str(c)] = await run_direct_level(llm, prompts[c], c, a.max_tokens)
                print(json.dumps({"direct": c, **result["direct"][str(c)]}), flush=True)
            save()

    asyncio.run(run_all())
    if llm is not None:
        llm.shutdown()
    serve.shutdown()
    ray.shutdown()
    result["total_s"] = round(time.time() - t_start, 1)
    save()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
