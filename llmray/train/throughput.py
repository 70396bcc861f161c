"""Training-step throughput of a model preset: the measurement behind bench/train.py's MFU numbers.

``measure`` times the harness's own step (``llmray.train.harness.train_step``) on random tokens;
``throughput_worker`` runs the variants one after the other inside a Ray Train worker (so the benchmark
measures what ``llmray pretrain`` runs) and writes their results to a JSON file.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from llmray.config import ModelConfig
from llmray.train.metrics import mfu

VARIANTS = [("torch", "blocks"), ("triton", "graphs"), ("triton", "none")]  # (kernels, compile | graphs)


def build_step(
    mc: ModelConfig, kernels: str, compile_mode: str, bsz: int, seq: int, device: str
) -> SimpleNamespace:
    """The model, Muon, random tokens and ``step()`` (one ``harness.train_step``) that ``measure`` times.

    ``compile_mode="blocks"`` compiles each decoder block (one graph reused by all 28); for the torch ops
    the loss (logits + cross-entropy) is compiled too, so the torch.compile-only baseline fuses its loss as
    a whole-model compile would. ``compile_mode="graphs"``: no compile; forward + backward replayed from a
    CUDA graph (``llmray.train.graphs.StepGraphs``), as ``llmray pretrain`` runs on one GPU.
    """
    from llmray.kernels.reference import linear_cross_entropy_ref
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.train.fsdp import compile_blocks
    from llmray.train.graphs import StepGraphs
    from llmray.train.harness import train_step
    from llmray.train.loop import build_optimizer

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(mc, kernels=kernels).train()
    if compile_mode == "blocks":
        compile_blocks(model)
        if model.ops.name == "torch":
            model._ops = dataclasses.replace(
                model.ops, linear_cross_entropy=torch.compile(linear_cross_entropy_ref)
            )
    opt = build_optimizer(model, "muon", lr=3e-4, muon_lr=0.02)
    params = list(model.parameters())
    x = torch.randint(0, mc.vocab_size, (bsz, seq + 1), device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    graphs = None
    if compile_mode == "graphs_nolinear":  # for comparison: the projections as nn.Linear under autocast
        model._ops = dataclasses.replace(model.ops, linear=None)
        compile_mode = "graphs"
    if compile_mode in ("graphs", "graphs_acc"):  # graphs_acc: StepGraphs(accumulate=True), for comparison
        graphs = StepGraphs(
            model, params, torch.device(device), dtype, accumulate=compile_mode == "graphs_acc"
        )

    def step() -> torch.Tensor:
        batch = [(x[:, :-1], x[:, 1:])]
        return train_step(model, batch, 1, opt, params, torch.device(device), dtype, 1.0, graphs=graphs)[0]

    return SimpleNamespace(model=model, opt=opt, params=params, x=x, dtype=dtype, graphs=graphs, step=step)


def measure(
    mc: ModelConfig, kernels: str, compile_mode: str, bsz: int, seq: int, device: str, steps: int = 10
) -> dict[str, Any]:
    """Full training steps (fwd + bwd + Muon) on random tokens: 3 (graphed: 4) warm-up steps, then ``steps``
    steps each timed by CUDA events; the step time is their median (the mean is reported beside it).

    The harness's own step (``llmray.train.harness.train_step``: bf16 autocast over fp32 master weights,
    clipping, the optimizer step inside the timed step), built by ``build_step``.
    """
    s = build_step(mc, kernels, compile_mode, bsz, seq, device)
    step, graphs = s.step, s.graphs
    t = time.perf_counter()
    for _ in range(4 if graphs is not None else 3):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    warm = time.perf_counter() - t
    gc.collect()
    gc.freeze()  # as train_steps does before its loop
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    per: list[float] = []
    for _ in range(steps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            loss = step()
            b.record()
            events.append((a, b))
        else:
            t = time.perf_counter()
            loss = step()
            per.append(time.perf_counter() - t)
    sync()
    gc.unfreeze()  # the next variant's set-up may free this one's cycles
    per += [a.elapsed_time(b) / 1e3 for a, b in events]
    s_per_step = statistics.median(per)  # a step's time: the median (a host stall in one step is not ours)
    tok_s = bsz * seq / s_per_step
    return {
        "tokens_per_s": tok_s, "mfu": mfu(tok_s, mc, seq), "step_s": s_per_step,
        "step_s_mean": sum(per) / len(per), "steps_s": [round(x, 5) for x in per],
        "tokens_per_s_mean": bsz * seq * len(per) / sum(per),
        "warmup_s_incl_compile": warm, "loss": float(loss),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
        "graph_replays": graphs.replays if graphs is not None else None,
        "timed_from_unix_s": round(time.time() - sum(per), 1),  # when the timed steps ran (wall clock)
    }  # fmt: skip


def throughput_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: every variant in one process, one after the other; results to a JSON file."""
    import ray.train.torch

    device = ray.train.torch.get_device().type
    torch.backends.cuda.matmul.allow_tf32 = True
    mc = ModelConfig.preset(config["preset"])
    res: dict[str, dict[str, Any] | str] = {}  # variant -> measurements or its failure
    for kernels, comp in config.get("variants", VARIANTS):
        name = kernels + {"none": "", "blocks": "+compile_blocks", "graphs": "+cuda_graphs"}.get(
            comp, "+" + comp
        )
        try:
            res[name] = measure(mc, kernels, comp, config["bsz"], config["seq"], device)
        except Exception as e:  # report, keep the other variants
            res[name] = f"failed: {type(e).__name__}: {str(e)[:400]}"
        print(f"(c) {name}: {res[name]}", flush=True)
        Path(config["out_file"]).write_text(json.dumps(res, indent=1))
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
