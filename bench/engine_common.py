"""Helpers shared by the engine benches (engine.py, engine_baselines.py and its modules): model, workload,
timing."""

from __future__ import annotations

import random
import time

import torch

from llmray.config import ModelConfig


def model_config(quick: bool) -> ModelConfig:
    if quick:
        return ModelConfig.preset("tiny", max_position_embeddings=4096)
    return ModelConfig.preset("qwen3-0.6b")


def build_model(cfg: ModelConfig, device: str, dtype: torch.dtype, kernels: str):
    from llmray.model.qwen3 import Qwen3ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg, kernels=kernels)
    return model.to(dtype).eval()


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    outs = [rng.randint(lo, hi) for _ in range(n)]
    return prompts, outs


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_generate(llm, prompts, params) -> float:
    sync()
    t = time.perf_counter()
    llm.generate(prompts, params)
    sync()
    return time.perf_counter() - t


def stream_times(engine, rid: str, prompt: list[int], params) -> list[float]:
    """Seconds from submission to each output of request ``rid`` (engine alone in the loop)."""
    engine.stream_outputs = True
    sync()
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, params)
    stamps = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                stamps.append(time.perf_counter() - t0)
    engine.stream_outputs = False  # (LLM.generate's setting)
    return stamps
