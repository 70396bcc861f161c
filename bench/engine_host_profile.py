"""Host timings of engine steps for ``bench/engine_baselines.py --profile``: sync vs async scheduling on
the workload, by batch size, plus torch.profiler tables (engine_profile.json, engine_profile.txt)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from engine_common import build_model, model_config, stream_times, sync, timed_generate, workload


class StepProfiler:
    """Host wall time per engine step: scheduling, launching (inputs + enqueue), waiting for the device
    (``collect``: the host sync), and the rest (postprocessing). With async scheduling the next step is
    launched before the current one is collected, so the wait is what the host overlap could not hide."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.rows: list[dict] = []
        self.saved = (engine.scheduler.schedule, engine.runner.launch, engine.runner.collect, engine.step)
        sched, launch, collect, step = self.saved
        cur: dict = {}

        def timed(name, fn):
            def wrapper(*a):
                t = time.perf_counter()
                r = fn(*a)
                cur[name] = cur.get(name, 0.0) + time.perf_counter() - t
                if name == "schedule":
                    cur["seqs"], cur["tokens"] = len(r.scheduled), r.num_tokens
                return r

            return wrapper

        def step_():
            t = time.perf_counter()
            cur.clear()
            r = step()
            cur["total"] = time.perf_counter() - t
            self.rows.append(dict(cur))
            return r

        engine.scheduler.schedule = timed("schedule", sched)
        engine.runner.launch = timed("launch", launch)
        engine.runner.collect = timed("collect", collect)
        engine.step = step_

    def restore(self) -> None:
        e = self.engine
        e.scheduler.schedule, e.runner.launch, e.runner.collect, e.step = self.saved

    def summary(self) -> dict:
        rows = self.rows
        big = [r for r in rows if r.get("seqs", 0) >= 200 and r.get("seqs") == r.get("tokens")]

        def tot(k, rs=rows):
            return sum(r.get(k, 0.0) for r in rs)

        def mean_ms(k):
            return tot(k, big) / len(big) * 1e3 if big else None

        return {
            "steps": len(rows),
            "wall_s": tot("total"),
            "schedule_s": tot("schedule"),
            "launch_s (inputs + enqueue, host)": tot("launch"),
            "collect_s (waiting for the device)": tot("collect"),
            "postprocess_s": tot("total") - tot("schedule") - tot("launch") - tot("collect"),
            "decode_steps_bs200+": len(big),
            "mean_step_ms_bs200+": mean_ms("total"),
            "mean_schedule_ms_bs200+": mean_ms("schedule"),
            "mean_launch_ms_bs200+": mean_ms("launch"),
            "mean_collect_ms_bs200+": mean_ms("collect"),
        }


def bins(rows: list[dict]) -> dict:
    """Per-step host timings grouped by batch size (decode-only steps) plus the mixed prefill steps."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "seqs" not in r:
            continue
        if r["seqs"] != r["tokens"]:
            key = "mixed"
        else:
            key = next(f"bs<={hi}" for hi in (8, 32, 64, 128, 199, 256) if r["seqs"] <= hi)
        groups.setdefault(key, []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {"steps": len(rs)} | {
            f"mean_{k}_ms": sum(r.get(k, 0.0) for r in rs) / len(rs) * 1e3
            for k in ("total", "schedule", "launch", "collect")
        }
    return out


def profile_main(args) -> None:
    """Sync vs async scheduling on the workload (host timings by batch size) + torch.profiler tables."""
    from torch.profiler import ProfilerActivity, profile

    from llmray.engine.llm import LLM
    from llmray.engine.sampling_params import SamplingParams

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args.quick)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = build_model(cfg, device, dtype, args.kernels)
    llm = LLM.from_model(model, kernels=args.kernels, max_num_seqs=256, max_num_batched_tokens=8192)
    engine = llm.engine
    prompts, outs = workload(args.num_seqs, args.min_len, args.max_len, cfg.vocab_size)
    sp = [SamplingParams(max_tokens=o, temperature=0.6, ignore_eos=True) for o in outs]
    llm.generate(
        workload(8, 16, 64, cfg.vocab_size, seed=1)[0], SamplingParams(max_tokens=16, ignore_eos=True)
    )
    res: dict = {"command": "python " + " ".join(sys.argv)}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    tables = []
    for key, overlap in (("sync", False), ("async", True)):
        engine.async_scheduling = overlap
        prof = StepProfiler(engine)
        dt = timed_generate(llm, prompts, sp)
        prof.restore()
        res[key] = {"seconds": dt, "output_tok_per_s": sum(outs) / dt, "by_batch": bins(prof.rows)}
        (out_dir / "engine_profile.json").write_text(json.dumps(res, indent=2))
        # torch.profiler over a few decode steps at batch 96 (after the prefill steps)
        for i in range(min(96, len(prompts))):
            engine.add_request(f"p{key}{i}", prompts[i], SamplingParams(max_tokens=40, ignore_eos=True))
        for _ in range(12):
            engine.step()
        with profile(activities=acts) as p:
            for _ in range(5):
                engine.step()
        sync()
        while engine.has_unfinished():
            engine.step()
        tables.append(f"=== {key}: 5 decode steps at batch 96 ===\n")
        tables.append(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    engine.stream_outputs = True
    stream_times(engine, "w", prompts[0][:1000], SamplingParams(max_tokens=1))
    with profile(activities=acts) as p:
        stream_times(engine, "t", prompts[1][:1000] + prompts[2][:24], SamplingParams(max_tokens=1))
    tables.append("=== one eager prefill step (1024 tokens) ===\n")
    tables.append(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    (out_dir / "engine_profile.txt").write_text("\n".join(tables))
    print(json.dumps(res, indent=2))
    print("\n".join(tables))
