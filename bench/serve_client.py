"""Load generation for bench/serve.py: HTTP clients in processes of their own, plus the summary statistics.

``run_http_level`` splits a level's requests over up to ``procs`` client processes (each an asyncio aiohttp
client holding its share of the concurrency), so the client's own JSON/SSE parsing never shares a core or a
GIL with the server it measures. Times are ``time.monotonic()`` (one clock for all processes on Linux).
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import Executor
from typing import Any


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput over the level's wall time (first send to last token) and per-request latencies."""
    ok = [r for r in records if r.get("error") is None]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1 and r["ttft"]]
    tokens = sum(r["tokens"] for r in ok)
    wall = max(r["end"] for r in records) - min(r["start"] for r in records)
    ms = lambda x: None if x is None else round(1000 * x, 3)  # noqa: E731
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "ttft_ms_p50": ms(pct(ttft, 50)),
        "ttft_ms_p99": ms(pct(ttft, 99)),
        "tpot_ms_p50": ms(pct(tpot, 50)),
        "tpot_ms_p99": ms(pct(tpot, 99)),
        "e2e_ms_p50": ms(pct([r["e2e"] for r in ok], 50)),
        "output_tokens": tokens,
        "output_tok_per_s": round(tokens / wall, 1) if wall > 0 else None,
        **({"chunks_per_s": round(sum(r.get("chunks", 0) for r in ok) / wall, 1)} if wall > 0 else {}),
        "wall_s": round(wall, 3),
    }


async def _http_request(session: Any, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.monotonic()
    ttft, tokens, chunks, error = None, 0, 0, None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            else:
                async for raw in resp.content:
                    if not raw.startswith(b"data: {"):
                        continue
                    chunks += 1
                    if ttft is None and b'"text": ""' not in raw[:400]:
                        ttft = time.monotonic() - t0
                    if b'"usage"' in raw:
                        chunk = json.loads(raw[6:])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                    elif b'"error"' in raw[:20]:
                        error = raw.decode()[:200]
    except Exception as e:  # a transport error is counted, never hidden
        error = f"{type(e).__name__}: {e}"
    end = time.monotonic()
    return {"ttft": ttft, "tokens": tokens, "chunks": chunks, "e2e": end - t0, "start": t0, "end": end,
            "error": error}  # fmt: skip


async def _client(url: str, model: str, prompts: list[list[int]], conc: int, max_tokens: int) -> list[dict]:
    import aiohttp

    sem = asyncio.Semaphore(conc)
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def one(p: list[int]) -> dict:
            async with sem:
                return await _http_request(session, url, model, p, max_tokens)

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def client_process(url: str, model: str, prompts: list[list[int]], conc: int, max_tokens: int) -> list[dict]:
    """Entry point of one client process."""
    return asyncio.run(_client(url, model, prompts, conc, max_tokens))


def run_http_level(
    pool: Executor, procs: int, url: str, model: str, prompts: list[list[int]], conc: int, max_tokens: int
) -> dict[str, Any]:
    n = max(1, min(procs, conc))
    shares = [prompts[i::n] for i in range(n)]
    concs = [conc // n + (1 if i < conc % n else 0) for i in range(n)]
    futures = [
        pool.submit(client_process, url, model, share, c, max_tokens)
        for share, c in zip(shares, concs, strict=True)
    ]
    records = [r for f in futures for r in f.result()]
    out = summarize(records)
    if out["errors"]:
        out["first_error"] = next(r["error"] for r in records if r["error"])
    return out


def warm_pool(pool: Executor, procs: int) -> None:
    """Start the client processes (and import aiohttp there) before anything is timed."""
    list(pool.map(_import_aiohttp, range(procs)))


def _import_aiohttp(_: int) -> None:
    import aiohttp  # noqa: F401
