"""Serving on several GPUs: throughput of 1 vs 2 engine replicas behind one ingress, and autoscaling 1 -> 2.

One Ray Serve app (``llmray.serve.app:build_app``; each ``LLMServer`` replica holds one engine and, on a
GPU machine, ``num_gpus: 1``), three phases. ``serve.run`` of a rebuilt app replaces every replica (the
Python API has no in-place update of ``build_app`` arguments), so phase 3 measures the two replicas the
autoscaler brought up in phase 2 instead of redeploying (replica names in the JSON show it):

1. ``fixed-1``: min = max = 1 replica; ``--requests`` streamed ``/v1/completions`` (random token-id
   prompts of ``--prompt-len``, ``--max-tokens`` new tokens, ``ignore_eos``) at ``--concurrency`` in flight.
2. ``autoscale``: min 1, max 2, ``target_ongoing_requests`` = ``--autoscale-target`` (low), short upscale
   delay; a closed loop keeps ``--concurrency`` requests in flight until the second replica has been
   RUNNING for ``--hold-s`` (or ``--autoscale-max-s`` passes). Replica counts (RUNNING / STARTING) and
   output tokens per second are sampled every 0.5 s: the second replica is added by Serve itself.
3. ``fixed-2``: 2 replicas (those of phase 2, still RUNNING: downscale delay 600 s; else a min = max = 2
   deployment); the same requests as phase 1.

Reported: output tokens/s of 1 and 2 replicas and their ratio (target >= 1.8), TTFT/ITL percentiles,
the replica timeline. The model is ``--model`` or a random-weight ``--preset`` (default qwen3-0.6b, bf16,
char tokenizer over the whole vocabulary, as bench/serve.py writes it).

    python bench/multigpu_serve.py --out $OUT/multigpu_serve.json                                   # 2 GPUs
    python bench/multigpu_serve.py --device cpu --preset tiny --concurrency 8 --requests 16 --max-tokens 16 \\
        --warmup-requests 8 --engine-kwargs '{"max_num_seqs": 8, "max_model_len": 256, "num_kv_blocks": 256}' \\
        --autoscale-target 1 --upscale-delay-s 0.5 --hold-s 3 --ingress-replicas 1 \\
        --prompt-len 8 --out /tmp/ms.json                                                            # CPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import http_request, make_prompts, summarize  # noqa: E402

T0 = time.perf_counter()
APP = "llmray"
# NVLink multicast off in NCCL, PyTorch symmetric memory and NVSHMEM, in every process (workers included)
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def log(msg: str) -> None:
    print(f"[multigpu_serve {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def write_random_model(out: Path, preset: str, device: str) -> Path:
    """Random weights of ``preset`` with a char tokenizer of exactly ``vocab_size`` tokens (bf16 on GPU)."""
    from llmray.config import ModelConfig
    from llmray.model.checkpoint import save_model
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.model.tokenizer import SPECIAL_TOKENS, char_tokenizer

    if (out / "config.json").exists():
        return out
    base = ModelConfig.preset(preset)
    n_chars = base.vocab_size - len(SPECIAL_TOKENS)
    cps = [c for c in range(0x4E00, 0x4E00 + n_chars + 2048) if not 0xD800 <= c <= 0xDFFF][:n_chars]
    tok = char_tokenizer("".join(map(chr, cps)), base_chars="")
    if tok.vocab_size != base.vocab_size:
        raise RuntimeError(f"char tokenizer has {tok.vocab_size} tokens, preset {preset} {base.vocab_size}")
    cfg = base.replace(eos_token_id=tok.eos_token_id, bos_token_id=None, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg, kernels="torch")
    save_model(model, out, tokenizer=tok, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the replicas on this GPU get its memory back
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_states() -> dict[str, int]:
    from ray import serve

    status = serve.status().applications[APP].deployments["LLMServer"]
    return {k: int(v) for k, v in status.replica_states.items()}


def replica_names() -> list[str]:
    """Serve's replica ids of LLMServer (a restarted replica gets a new one)."""
    import ray

    actors = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"].split("#")[-1] for a in actors if "#LLMServer#" in a["name"])


def deploy(args, model_dir: Path, min_r: int, max_r: int, target: float | None, use_gpu: bool) -> None:
    """(Re)deploy the app with these autoscaling bounds; returns when ``min_r`` replicas are RUNNING."""
    from ray import serve

    from llmray.serve.app import build_app

    app_args: dict[str, Any] = {
        "model": str(model_dir), "served_model_name": "bench", "engine": args.engine,
        "engine_kwargs": json.loads(args.engine_kwargs), "use_gpu": use_gpu, "min_replicas": min_r,
        "max_replicas": max_r, "max_queued_requests": -1, "ingress_replicas": args.ingress_replicas,
        "ingress_num_cpus": 1.0 if use_gpu else 0.1, "num_cpus": 0.25,
        "stream_interval_ms": args.stream_interval_ms,
        "autoscaling_overrides": {"upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": 600.0,
                                  "metrics_interval_s": 0.5, "look_back_period_s": 2.0},
    }  # fmt: skip
    if target is not None:
        app_args["target_ongoing_requests"] = target
    serve.run(build_app(app_args), name=APP, route_prefix="/", blocking=False)
    deadline = time.monotonic() + 300
    while replica_states().get("RUNNING", 0) < min_r:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{min_r} LLMServer replicas not RUNNING after 300 s: {replica_states()}")
        time.sleep(0.5)
    while serve.status().applications[APP].status != "RUNNING":
        time.sleep(0.5)


async def fixed_level(url: str, prompts: list[list[int]], conc: int, max_tokens: int) -> dict[str, Any]:
    import aiohttp

    sem = asyncio.Semaphore(conc)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=900)) as session:

        async def one(p: list[int]) -> dict:
            async with sem:
                return await http_request(session, url, "bench", p, max_tokens)

        t0 = time.perf_counter()
        records = await asyncio.gather(*(one(p) for p in prompts))
        return summarize(list(records), time.perf_counter() - t0)


async def autoscale_run(url: str, prompts: list[list[int]], conc: int, max_tokens: int, hold_s: float,
                        max_s: float) -> dict[str, Any]:  # fmt: skip
    """Closed loop of ``conc`` streams until 2 replicas ran ``hold_s`` (or ``max_s``); timeline every 0.5 s."""
    import aiohttp

    stop = asyncio.Event()
    done = {"requests": 0, "tokens": 0}
    timeline: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    async def client(i: int, session) -> None:
        k = i
        while not stop.is_set():
            r = await http_request(session, url, "bench", prompts[k % len(prompts)], max_tokens)
            done["requests"] += 1
            done["tokens"] += r["tokens"]
            k += conc

    async def monitor() -> None:
        two_since = None
        last_tokens, last_t = 0, time.perf_counter()
        while True:
            await asyncio.sleep(0.5)
            states = await asyncio.to_thread(replica_states)
            now = time.perf_counter()
            timeline.append({"t_s": round(now - t0, 2), "replicas": states, "requests_done": done["requests"],
                             "output_tok_per_s": round((done["tokens"] - last_tokens) / (now - last_t), 1)})  # fmt: skip
            last_tokens, last_t = done["tokens"], now
            if states.get("RUNNING", 0) >= 2:
                two_since = two_since or now
                if now - two_since >= hold_s:
                    break
            if now - t0 >= max_s:
                break
        stop.set()

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=900)) as session:
        clients = [asyncio.create_task(client(i, session)) for i in range(conc)]
        await monitor()
        await asyncio.gather(*clients)  # each finishes its current request
    first_two = next((p["t_s"] for p in timeline if p["replicas"].get("RUNNING", 0) >= 2), None)
    first_starting = next((p["t_s"] for p in timeline if p["replicas"].get("STARTING", 0) >= 1), None)
    return {
        "scaled_to_2": first_two is not None,
        "second_replica_starting_at_s": first_starting,
        "second_replica_running_at_s": first_two,
        "wall_s": round(time.perf_counter() - t0, 2),
        "requests_done": done["requests"],
        "timeline": timeline,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", default=str(Path(os.environ.get("OUT", ROOT / "bench" / "results")) / "multigpu_serve.json")
    )
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--model", help="model dir (default: random weights of --preset written to --model-out)")
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--model-out", default="")
    ap.add_argument("--engine", choices=("llmray", "mock"), default="llmray")
    ap.add_argument("--concurrency", type=int, default=512)
    ap.add_argument("--requests", type=int, default=0, help="per fixed phase (default 2 x concurrency)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--engine-kwargs", default='{"max_num_seqs": 256, "max_model_len": 4096, "num_kv_blocks": 8192}'
    )
    ap.add_argument("--ingress-replicas", type=int, default=2)
    ap.add_argument("--stream-interval-ms", type=float, default=50.0, help="LLMServer token batching")
    ap.add_argument("--autoscale-target", type=float, default=32.0, help="target_ongoing_requests")
    ap.add_argument("--upscale-delay-s", type=float, default=3.0)
    ap.add_argument("--hold-s", type=float, default=10.0, help="load kept this long after 2 replicas run")
    ap.add_argument("--autoscale-max-s", type=float, default=150.0)
    ap.add_argument("--phases", default="fixed-1,autoscale,fixed-2")
    ap.add_argument(
        "--warmup-requests", type=int, default=256, help="32-token requests before each fixed phase"
    )
    a = ap.parse_args()  # fmt: skip

    use_gpu = a.device == "cuda"
    if use_gpu and torch.cuda.device_count() < 2:
        print(f"needs 2 GPUs for 2 replicas, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    t_start = time.time()
    model_out = Path(a.model_out or f"/tmp/llmray-{a.preset}-random{'' if use_gpu else '-cpu'}")
    model_dir = Path(a.model) if a.model else write_random_model(model_out, a.preset, a.device)
    from llmray.model.tokenizer import Tokenizer

    vocab = Tokenizer.load(model_dir).vocab_size - 3  # plain tokens only (the last three are special)
    n_req = a.requests or 2 * a.concurrency
    phases = [p for p in a.phases.split(",") if p]
    result: dict[str, Any] = {
        "bench": "multigpu_serve",
        "command": "python " + " ".join(sys.argv),
        "device": a.device,
        "device_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if use_gpu else ["cpu"],
        "model": str(model_dir) if a.model else f"{a.preset} random weights",
        "config": {k: v for k, v in vars(a).items() if k != "out"} | {"requests": n_req},
        "setup_s": round(time.time() - t_start, 1),
        "phases": {},
    }  # fmt: skip
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        ph = result["phases"]
        if "fixed-1" in ph and "fixed-2" in ph:
            ratio = ph["fixed-2"]["output_tok_per_s"] / ph["fixed-1"]["output_tok_per_s"]
            result["throughput_ratio_2_over_1"] = round(ratio, 3)
            result["target_ratio"] = 1.8
            result["met"] = ratio >= 1.8
        result["total_s"] = round(time.time() - t_start, 1)
        out.write_text(json.dumps(result, indent=2))

    import ray
    from ray import serve

    os.environ.update(NCCL_ENV)
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(NCCL_ENV)})  # fmt: skip
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    # distinct prompts per phase: no prefix-cache hits on what an earlier phase sent
    prompts = {ph: make_prompts(n_req, a.prompt_len, vocab, seed=i + 1) for i, ph in enumerate(phases)}
    # warm-up at full batch, so Triton compiles and CUDA graphs of every batch size happen before the clock
    warm = make_prompts(a.warmup_requests, a.prompt_len, vocab, seed=999)
    try:
        for phase in phases:
            t = time.time()
            if phase == "autoscale":
                deploy(a, model_dir, 1, 2, a.autoscale_target, use_gpu)
                log(f"autoscale: deployed (min 1, max 2, target {a.autoscale_target}), {replica_states()}")
                r = asyncio.run(
                    autoscale_run(
                        url, prompts[phase], a.concurrency, a.max_tokens, a.hold_s, a.autoscale_max_s
                    )
                )
                r["deploy_s"] = round(time.time() - t - r["wall_s"], 1)
                r["replica_names"] = replica_names()
                log(
                    f"autoscale: scaled_to_2={r['scaled_to_2']} (running at {r['second_replica_running_at_s']} s)"
                )
            elif phase in ("fixed-1", "fixed-2"):
                n = int(phase[-1])
                reuse = n == 2 and "autoscale" in result["phases"] and replica_states().get("RUNNING", 0) == 2
                if not reuse:
                    deploy(a, model_dir, n, n, None, use_gpu)
                deploy_s = round(time.time() - t, 1)
                log(f"{phase}: {replica_states()} after {deploy_s} s; warm-up")
                asyncio.run(fixed_level(url, warm, min(len(warm), a.concurrency), 32))
                r = asyncio.run(fixed_level(url, prompts[phase], a.concurrency, a.max_tokens))
                r.update(deploy_s=deploy_s, replicas=replica_states(), replica_names=replica_names(),
                         reused_autoscaled_replicas=reuse)  # fmt: skip
                log(f"{phase}: {r['output_tok_per_s']:,.0f} output tok/s, TTFT p50 {r['ttft_ms_p50']} ms")
            else:
                raise SystemExit(f"unknown phase {phase!r}: fixed-1, autoscale, fixed-2")
            result["phases"][phase] = r
            save()
    finally:
        serve.shutdown()
        ray.shutdown()
    save()
    log(json.dumps({k: result.get(k) for k in ("throughput_ratio_2_over_1", "met", "total_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
