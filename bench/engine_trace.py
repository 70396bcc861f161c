"""What a timed run pays that another does not: per-run trace for ``bench/engine.py --trace FILE``.

Around each timed run it records, at a few microseconds per step:
- the steps: wall seconds of the prefill phase (until the step after the last one that computed a prompt
  chunk is read back) and of the decode phase that follows, with their step counts and prompt tokens;
- Triton compilations (kernel, seconds) through ``JITFunction._do_compile`` (none should happen after
  ``LLM()`` returned); CUDA graphs captured during the run (none should);
- Python GC collections by generation and their seconds; CUDA allocator segments allocated (cudaMalloc
  calls) and bytes reserved before/after.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager

import torch


class RunTracer:
    active: RunTracer | None = (
        None  # the tracer inside run(): Triton's compile hook is patched once per process
    )

    def __init__(self, engine) -> None:
        self.engine = engine
        self.runs: list[dict] = []
        self._compiles: list[tuple[str, float]] | None = None
        self._patch_triton()

    def _patch_triton(self) -> None:
        try:
            from triton.runtime.jit import JITFunction
        except ImportError:
            return
        orig = getattr(JITFunction, "_do_compile", None)
        if orig is None or getattr(orig, "_traced", False):
            return

        def traced(fn_self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return orig(fn_self, *args, **kwargs)
            finally:
                tracer = RunTracer.active
                if tracer is not None and tracer._compiles is not None:
                    name = getattr(getattr(fn_self, "fn", None), "__name__", str(fn_self))
                    tracer._compiles.append((name, round(time.perf_counter() - t, 4)))

        traced._traced = True  # type: ignore[attr-defined]
        JITFunction._do_compile = traced  # type: ignore[method-assign]

    @contextmanager
    def run(self, label: str):
        engine, sched = self.engine, self.engine.scheduler
        schedule, step = sched.schedule, engine.step
        events: list[tuple[float, int, int]] = []  # (time, tokens, seqs) of each schedule()
        returns: list[float] = []  # time each step() returned
        gcs: list[tuple[int, float]] = []
        gc_start: list[float] = []

        def schedule_(*a):
            out = schedule(*a)
            events.append((time.perf_counter(), out.num_tokens, len(out.scheduled)))
            return out

        def step_(*a):
            out = step(*a)
            returns.append(time.perf_counter())
            return out

        def on_gc(phase, info):
            if phase == "start":
                gc_start.append(time.perf_counter())
            elif gc_start:
                gcs.append((info.get("generation", -1), time.perf_counter() - gc_start.pop()))

        cuda = torch.cuda.is_available()
        graphs = len(getattr(engine.runner, "graphs", {}) or {})
        stats0 = torch.cuda.memory_stats() if cuda else {}
        self._compiles = []
        RunTracer.active = self
        sched.schedule, engine.step = schedule_, step_
        gc.callbacks.append(on_gc)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            t1 = time.perf_counter()
            gc.callbacks.remove(on_gc)
            sched.schedule, engine.step = schedule, step
            compiles, self._compiles = self._compiles, None
            RunTracer.active = None
            stats1 = torch.cuda.memory_stats() if cuda else {}
            self.runs.append(
                _summary(label, t0, t1, events, returns, gcs, compiles, stats0, stats1)
                | {"graphs_captured_during_run": len(getattr(engine.runner, "graphs", {}) or {}) - graphs}
            )


def _summary(label, t0, t1, events, returns, gcs, compiles, stats0, stats1) -> dict:
    prefill = [i for i, (_, tok, seqs) in enumerate(events) if tok != seqs]
    last = prefill[-1] if prefill else -1
    # async scheduling launches one step ahead: the step scheduled at event i is read back by the
    # (i + 1)-th step() return at the latest
    end_idx = min(last + 1, len(returns) - 1) if last >= 0 and returns else -1
    t_prefill_end = returns[end_idx] if end_idx >= 0 else t0
    seg = "segment.all.allocated"
    return {
        "label": label,
        "wall_s": round(t1 - t0, 4),
        "steps": len(events),
        "prefill_phase": {
            "wall_s": round(t_prefill_end - t0, 4),
            "steps": last + 1,
            "steps_with_prompt_chunks": len(prefill),
            "tokens": sum(events[i][1] for i in range(last + 1)),
        },
        "decode_phase": {
            "wall_s": round(t1 - t_prefill_end, 4),
            "steps": len(events) - last - 1,
            "ms_per_step": round((t1 - t_prefill_end) / max(1, len(events) - last - 1) * 1e3, 4),
        },
        "triton_compiles": compiles,
        "triton_compile_s": round(sum(s for _, s in compiles), 4),
        "gc": {
            "collections_by_gen": {g: sum(1 for x, _ in gcs if x == g) for g in sorted({x for x, _ in gcs})},
            "seconds": round(sum(s for _, s in gcs), 4),
        },
        "cuda_segments_allocated": stats1.get(seg, 0) - stats0.get(seg, 0),
        "cuda_reserved_gib": [
            round(s.get("reserved_bytes.all.current", 0) / 2**30, 3) for s in (stats0, stats1)
        ],
    }


def prefill_step_kernels(llm, vocab: int, tokens: int = 8192, seqs: int = 16, top: int = 12) -> dict:
    """torch.profiler over one fresh full-budget prefill step (``seqs`` prompts of tokens/seqs, one output
    token each: nothing cached): device ms by kernel, the largest ``top``, and the step's wall ms."""
    import random

    from torch.profiler import ProfilerActivity, profile

    from llmray.engine.sampling_params import SamplingParams

    rng = random.Random(7)
    prompts = [[rng.randrange(vocab) for _ in range(tokens // seqs)] for _ in range(seqs)]
    one = SamplingParams(max_tokens=1, temperature=0.6, ignore_eos=True)
    llm.generate([[(t + 1) % vocab for t in p] for p in prompts], one)  # the same shapes, unprofiled, no hits
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        llm.generate(prompts, one)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        runtime = e.key.startswith(("aten::", "cuda", "cuLaunch", "cuMem", "cuStream", "cuEvent"))
        if dev > 0 and not runtime:  # kernels only: no op or CUDA runtime-call rows (counted twice)
            rows.append((e.key[:90], e.count, round(dev / 1e3, 3)))
    rows.sort(key=lambda r: -r[2])
    return {
        "tokens": tokens,
        "seqs": seqs,
        "wall_ms (profiled)": round(wall * 1e3, 2),
        "device_ms_total": round(sum(r[2] for r in rows), 3),
        "top_kernels (name, calls, device ms)": rows[:top],
    }
