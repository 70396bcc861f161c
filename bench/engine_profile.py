"""The step profile and decode-kernel timing of ``bench/engine.py`` (engine_profile.json).

- ``profile``: per step, host ms (schedule, launch = inputs + enqueue, postprocess) and device ms (CUDA
  events around the step's work) with synchronous scheduling, plus the step wall time with async
  scheduling, for batch-256 decode steps and mixed steps.
- ``decode_kernel_ms``: the paged decode kernel alone at batch 256, bf16 vs fp8 cache.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from llmray.config import ModelConfig
from llmray.engine.sampling_params import SamplingParams


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def step_timers(engine, cur: dict, marks: list | None = None):
    """Wrap the engine's schedule / launch / collect while inside: host seconds of each into ``cur`` (and the
    scheduled step's seqs and tokens); on CUDA, (start, end) events around each launch into cur["events"]
    and, with ``marks``, appended there as (events, seqs, tokens)."""
    runner, sched = engine.runner, engine.scheduler
    schedule, launch, collect = sched.schedule, runner.launch, runner.collect
    cuda = torch.cuda.is_available()

    def schedule_(*a):
        t = time.perf_counter()
        out = schedule(*a)
        cur["schedule"] = time.perf_counter() - t
        cur["seqs"], cur["tokens"] = len(out.scheduled), out.num_tokens
        return out

    def launch_(*a):
        t = time.perf_counter()
        ev = None
        if cuda:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
        out = launch(*a)
        if ev is not None:
            ev[1].record()
            cur["events"] = ev
        if marks is not None:
            marks.append((ev, cur.get("seqs"), cur.get("tokens")))
        cur["launch"] = time.perf_counter() - t
        return out

    def collect_(*a):
        t = time.perf_counter()
        out = collect(*a)
        cur["collect"] = time.perf_counter() - t
        return out

    sched.schedule, runner.launch, runner.collect = schedule_, launch_, collect_
    try:
        yield
    finally:
        sched.schedule, runner.launch, runner.collect = schedule, launch, collect


def drain_steps(engine, cur: dict) -> list[dict]:
    """Step ``engine`` until no request is left; one row per step: what ``step_timers`` put in ``cur``,
    plus the step's wall seconds."""
    rows = []
    while engine.has_unfinished():
        cur.clear()
        t = time.perf_counter()
        engine.step()
        cur["wall"] = time.perf_counter() - t
        rows.append(dict(cur))
    return rows


def profile(llm, prompts, outs) -> dict:
    """Per-step host ms vs device ms (sync scheduling) and step wall ms (async), by step kind. Each mode runs
    prompts no earlier run has seen (token ids shifted), so its prefill steps miss the prefix cache."""
    engine = llm.engine
    cur: dict = {}
    sp = [SamplingParams(max_tokens=o, temperature=0.6, ignore_eos=True) for o in outs]
    res = {}
    try:
        with step_timers(engine, cur):
            vocab = engine.model_config.vocab_size
            for m, mode in enumerate(("sync", "async")):
                engine.async_scheduling = mode == "async"
                for i, (p, s) in enumerate(zip(prompts, sp, strict=True)):
                    engine.add_request(f"prof-{mode}-{i}", [(t + 7919 * (m + 1)) % vocab for t in p], s)
                rows = drain_steps(engine, cur)
                sync()
                res[mode] = _summarise(rows, mode)
    finally:
        engine.async_scheduling = True
    return res


def _summarise(rows: list[dict], mode: str) -> dict:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "seqs" not in r:
            continue
        key = "mixed" if r["tokens"] != r["seqs"] else ("decode_bs200+" if r["seqs"] >= 200 else None)
        if key:
            groups.setdefault(key, []).append(r)
    out = {}
    for key, rs in groups.items():
        n = len(rs)
        mean = lambda k, rs=rs, n=n: sum(r.get(k, 0.0) for r in rs) / n * 1e3  # noqa: E731
        d = {"steps": n, "mean_tokens": sum(r["tokens"] for r in rs) / n, "step_wall_ms": mean("wall")}
        if mode == "sync":
            d |= {
                "host_schedule_ms": mean("schedule"),
                "host_launch_ms (inputs + enqueue)": mean("launch"),
                "host_postprocess_ms": mean("wall") - mean("schedule") - mean("launch") - mean("collect"),
                "device_ms (events around the step)": sum(
                    r["events"][0].elapsed_time(r["events"][1]) for r in rs if "events" in r
                )
                / n,
            }
        out[key] = d
    return out


def decode_kernel_ms(cfg: ModelConfig) -> dict:
    """Paged decode kernel alone at batch 256, context 843 (the workload's mean): bf16 vs fp8 cache."""
    import triton

    from llmray.kernels.paged_attention import paged_decode

    h, hkv, d, page, bsz, ctx = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 16, 256, 843
    nblk = -(-ctx // page)
    q = torch.randn(bsz, h, d, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(bsz * nblk, device="cuda").view(bsz, nblk).to(torch.int32)
    lens = torch.full((bsz,), ctx, device="cuda", dtype=torch.int32)
    scale = torch.ones(1, device="cuda")
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        kc = torch.randn(bsz * nblk, page, hkv, d, device="cuda").to(dtype)
        vc = torch.randn_like(kc, dtype=torch.float32).to(dtype)
        out[name] = triton.testing.do_bench(
            lambda kc=kc, vc=vc: paged_decode(q, kc, vc, tables, lens, d**-0.5, k_scale=scale, v_scale=scale)
        )
        del kc, vc
    return out
