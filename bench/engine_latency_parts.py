"""Sections of bench/engine_latency.py beside its spans: per-source-line host us of a prefix hit (lines), the
prefill split-K A/B (splits:8/16), the prefix pair's medians over many rounds (prefix), a cProfile of the
hit's host path (hostprof)."""

from __future__ import annotations

import random
import statistics
import sys
import time

from llmray.engine.sampling_params import SamplingParams


class LineTimer:
    """Host microseconds per source line of the given functions (sys.settrace on their frames only): where a
    request's pre-GPU Python goes. The tracer inflates each line by about the same constant; C calls (numpy,
    torch) are measured as they are."""

    def __init__(self, funcs) -> None:
        self.codes = {f.__code__: f.__qualname__ for f in funcs}
        self.acc: dict[tuple[str, int], list[float]] = {}
        self._last: dict = {}

    def _local(self, frame, event, arg):
        now = time.perf_counter()
        prev = self._last.get(frame)
        if prev is not None:
            key = (self.codes[frame.f_code], prev[0])
            self.acc.setdefault(key, []).append(now - prev[1])
        if event == "return":
            self._last.pop(frame, None)
        else:
            self._last[frame] = (frame.f_lineno, time.perf_counter())
        return self._local

    def _global(self, frame, event, arg):
        if event == "call" and frame.f_code in self.codes:
            self._last[frame] = (frame.f_lineno, time.perf_counter())
            return self._local
        return None

    def __enter__(self):
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)

    def table(self, calls: int, top: int = 25) -> list:
        rows = [(k[0], k[1], round(sum(v) / calls * 1e6, 1)) for k, v in self.acc.items()]
        rows.sort(key=lambda r: -r[2])
        return rows[:top]


def line_times(llm, vocab: int, quick: bool, repeats: int) -> dict:
    """Per-line host us of a prefix hit's add_request, schedule and input building (``LineTimer``)."""
    import inspect

    engine = llm.engine
    r, sched = engine.runner, engine.scheduler
    bm = sched.block_manager
    funcs = [
        engine.add_request, engine.encode, sched.schedule, bm.find_cached_prefix, bm.allocate,
        r.inputs.build, r.inputs.rows.sync, r.launch, r._run_model, engine._launch, engine._read_back,
        sched.finish, bm.free, bm.cache_full_blocks,
    ]  # fmt: skip
    funcs = [inspect.unwrap(getattr(f, "__func__", f)) for f in funcs]
    rng = random.Random(11)
    rand = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    cold_len, shared = (2048, 2000) if not quick else (256, 240)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    a = rand(cold_len)
    llm.generate([a], one)
    timer = LineTimer(funcs)
    with timer:
        for _ in range(repeats):
            llm.generate([a[:shared] + rand(cold_len - shared)], one)
    return {"calls": repeats, "top (function, line, us per hit)": timer.table(repeats)}


def prefix_pair(llm, vocab: int, quick: bool, seed: int, rounds: int = 5) -> dict:
    """Median cold and hit TTFT (fresh random prompts: nothing cached from earlier sections) and a single
    stream's TPOT."""
    from engine_common import stream_times

    engine = llm.engine
    rng = random.Random(seed)
    rand = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    cold_len, shared = (2048, 2000) if not quick else (256, 240)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    colds, hits = [], []
    for i in range(rounds + 1):
        a = rand(cold_len)
        cold = stream_times(engine, f"pc{seed}-{i}", a, one)[0] * 1e3
        hit = stream_times(engine, f"ph{seed}-{i}", a[:shared] + rand(cold_len - shared), one)[0] * 1e3
        if i:
            colds.append(cold)
            hits.append(hit)
    greedy = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    stamps = stream_times(engine, f"pt{seed}", rand(512), greedy)
    cold, hit = statistics.median(colds), statistics.median(hits)
    return {
        "cold_ttft_ms": round(cold, 4),
        "hit_ttft_ms": round(hit, 4),
        "hit_over_cold": round(hit / cold, 4),
        "tpot_ms": round((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3, 4),
    }


def splits_ab(llm, vocab: int, quick: bool, values: list[int]) -> dict:
    """The prefix figures at each split-K count of small prefill steps (mixed and prefill graphs <= 256 tokens
    captured again per value), then back to the runner's own."""
    from llmray.engine import runner as runner_mod

    r = llm.engine.runner
    own = r.prefill_splits
    graphs = r._cuda_graphs
    small = lambda kind, b: kind != "decode" and b <= runner_mod.PREFILL_SPLIT_TOKENS  # noqa: E731
    out = {}
    for k, sp in enumerate([*values, own]):
        r.prefill_splits = sp
        if graphs is not None and graphs.graphs:
            graphs.capture(only=small)
        out[f"splits{sp}" + ("_again" if k == len(values) else "")] = prefix_pair(llm, vocab, quick, 100 + k)
    return out


def host_profile(llm, vocab: int, quick: bool, repeats: int, top: int = 40) -> dict:
    """cProfile of ``repeats`` prefix hits (each after its cold prompt, which is not profiled): the functions
    of the hit's host path by own time and by cumulative time (us per hit; the profiler inflates calls)."""
    import cProfile
    import pstats

    from engine_common import stream_times

    engine = llm.engine
    rng = random.Random(13)
    rand = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    cold_len, shared = (2048, 2000) if not quick else (256, 240)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prof = cProfile.Profile()
    for i in range(repeats + 1):
        a = rand(cold_len)
        stream_times(engine, f"hpc{i}", a, one)
        hit = a[:shared] + rand(cold_len - shared)
        if i:
            prof.enable()
        stream_times(engine, f"hph{i}", hit, one)
        prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, name), (_, ncalls, tot, cum, _) in st.stats.items():  # type: ignore[attr-defined]
        where = f"{file.rsplit('/', 2)[-1]}:{line}({name})" if file != "~" else name
        rows.append((where, ncalls / repeats, round(tot / repeats * 1e6, 1), round(cum / repeats * 1e6, 1)))
    by_own = sorted(rows, key=lambda r: -r[2])[:top]
    by_cum = sorted(rows, key=lambda r: -r[3])[:top]
    return {"hits": repeats, "(where, calls, own us, cum us) by own": by_own, "by cum": by_cum}
