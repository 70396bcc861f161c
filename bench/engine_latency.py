"""Where a request's first token and a step's time go: host spans vs device time, on the engine as built.

    python bench/engine_latency.py --out DIR            # one GPU, ~40 s after the engine is built
    python bench/engine_latency.py --quick --out /tmp/l # tiny model on CPU: script check

- ``ttft``: bench/engine.py's latency figures (TPOT, single-stream TTFT, prefix hit / cold) and, for a
  prefix hit, a cold 2,048-token prompt, a 512-token prompt and a decode step of one stream, the host
  seconds of each part (add_request, schedule, inputs, model enqueue, sampler enqueue, wait for the
  device, postprocess) next to CUDA-event device times (GPU idle while the host builds the inputs, the
  forward, lm_head + sampler). Medians of ``--repeats`` requests.
- ``kernels``: torch.profiler device ms by kernel of one prefix-hit step, one cold step and a batch-256
  decode step (what the device runs), and a chrome trace of the hit (``--traces``).
- ``run1``: one uncached nano-vllm workload run with CUDA events per step: device ms of the prompt steps
  and of the decode steps vs their wall time (a host-bound phase shows as wall > device).
- ``profile``: bench/engine_profile.py's per-step host vs device ms (engine_profile.json's format).
Writes latency.json after every section.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import build_model, latency, make_llm, workload  # noqa: E402
from engine_common import sync  # noqa: E402
from engine_latency_parts import host_profile, line_times, prefix_pair, splits_ab  # noqa: E402
from engine_profile import profile, step_timers  # noqa: E402

from llmray.engine.sampling_params import SamplingParams  # noqa: E402

CUDA = torch.cuda.is_available()


class Spans:
    """perf_counter marks at the engine's seams for one request; CUDA events where the device work starts."""

    def __init__(self, engine) -> None:
        self.engine, self.marks, self.events = engine, {}, {}
        r, s = engine.runner, engine.scheduler
        self.saved = [
            (s, "schedule"),
            (r.inputs, "build"),
            (r, "_sample_step"),
            (r, "collect"),
            (r, "launch"),
        ]
        if r._cuda_graphs is not None:
            self.saved.append((r._cuda_graphs, "replay"))
        self.saved.append((r, "_forward"))
        self.originals = [(obj, name, getattr(obj, name)) for obj, name in self.saved]
        for obj, name, fn in self.originals:
            setattr(obj, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def w(*a, **k):
            self._mark(f"{name}<")
            out = fn(*a, **k)
            self._mark(f"{name}>")
            return out

        return w

    def _mark(self, key: str) -> None:
        if key not in self.marks:  # the first occurrence in this request
            self.marks[key] = time.perf_counter()
            if CUDA and key in ("launch<", "build>", "replay<", "replay>", "_forward>", "launch>"):
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self.events[key] = ev

    def restore(self) -> None:
        for obj, name, fn in self.originals:
            setattr(obj, name, fn)

    def request(self, rid: str, prompt: list[int], params) -> dict:
        """Host ms between the seams of one request's first token; device ms between the events."""
        engine = self.engine
        engine.stream_outputs = True
        self.marks, self.events = {}, {}
        sync()
        t0 = time.perf_counter()
        engine.add_request(rid, prompt, params)
        t_add = time.perf_counter()
        first = None
        while engine.has_unfinished():
            outs = engine.step()
            if first is None and any(o.request_id == rid for o in outs):
                first = time.perf_counter()
        engine.stream_outputs = False
        sync()
        m = self.marks
        ms = lambda a, b: (m[b] - m[a]) * 1e3 if a in m and b in m else None  # noqa: E731
        fwd = "replay" if "replay<" in m else "_forward"
        row = {
            "ttft_ms": (first - t0) * 1e3 if first else None,
            "add_request_ms": (t_add - t0) * 1e3,
            "to_schedule_ms": (m["schedule<"] - t_add) * 1e3 if "schedule<" in m else None,
            "schedule_ms": ms("schedule<", "schedule>"),
            "schedule_to_launch_ms": ms("schedule>", "launch<"),
            "inputs_ms": ms("build<", "build>"),
            "build_to_forward_ms": ms("build>", f"{fwd}<"),
            "forward_enqueue_ms": ms(f"{fwd}<", f"{fwd}>"),
            "lm_head_sampler_enqueue_ms": ms(f"{fwd}>", "launch>"),
            "launch_to_collect_ms": ms("launch>", "collect<"),
            "collect_wait_ms": ms("collect<", "collect>"),
            "after_collect_ms": (first - m["collect>"]) * 1e3 if first and "collect>" in m else None,
            "forward": fwd,
        }
        e = self.events
        if CUDA and "launch<" in e and "launch>" in e:
            dev = lambda a, b: e[a].elapsed_time(e[b]) if a in e and b in e else None  # noqa: E731
            row["dev_launch_to_inputs_ms (GPU idle: host builds)"] = dev("launch<", "build>")
            row["dev_forward_ms"] = dev("replay<", "replay>") or dev("build>", "_forward>")
            row["dev_after_forward_ms (lm_head, sampler, copy)"] = dev(f"{fwd}>", "launch>")
            row["dev_launch_ms"] = dev("launch<", "launch>")
        return row


def median_rows(rows: list[dict]) -> dict:
    out = {}
    for k, v in rows[0].items():
        vals = [r[k] for r in rows if isinstance(r.get(k), float | int)]
        out[k] = round(statistics.median(vals), 4) if vals else v
    return out


def ttft_breakdown(llm, vocab: int, quick: bool, repeats: int) -> dict:
    rng = random.Random(5)
    rand = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    cold_len, shared, plen = (2048, 2000, 512) if not quick else (256, 240, 64)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    two = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    spans = Spans(llm.engine)
    res: dict = {}
    try:
        rows: dict[str, list] = {"hit": [], "cold": [], "prompt512": []}
        for i in range(repeats + 1):  # the first round warms the shapes
            a = rand(cold_len)
            cold = spans.request(f"c{i}", a, one)
            hit = spans.request(f"h{i}", a[:shared] + rand(cold_len - shared), one)
            p512 = spans.request(f"p{i}", rand(plen), one)
            if i:
                rows["cold"].append(cold)
                rows["hit"].append(hit)
                rows["prompt512"].append(p512)
        res = {k: median_rows(v) for k, v in rows.items()}
        # one decode step of a single stream, alone (synchronous): host vs device of a TPOT step
        engine = llm.engine
        engine.async_scheduling = False
        dec = []
        for i in range(repeats):
            engine.add_request(f"d{i}", rand(plen), two)
            engine.step()  # the prompt step (first token)
            spans.marks, spans.events = {}, {}
            t = time.perf_counter()
            engine.step()  # the decode step
            row = {"step_ms": (time.perf_counter() - t) * 1e3}
            m, e = spans.marks, spans.events
            fwd = "replay" if "replay<" in m else "_forward"
            row["host_to_forward_ms"] = (m[f"{fwd}<"] - t) * 1e3
            row["collect_wait_ms"] = (m["collect>"] - m["collect<"]) * 1e3
            if CUDA:
                row["dev_forward_ms"] = e["replay<"].elapsed_time(e["replay>"]) if "replay<" in e else None
                row["dev_launch_ms"] = e["launch<"].elapsed_time(e["launch>"])
            while engine.has_unfinished():
                engine.step()
            dec.append(row)
        engine.async_scheduling = True
        res["decode_step_bs1_sync"] = median_rows(dec)
    finally:
        spans.restore()
        llm.engine.async_scheduling = True
    return res


def kernel_table(prof, top: int = 14) -> dict:
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        runtime = e.key.startswith(("aten::", "cuda", "cuLaunch", "cuMem", "cuStream", "cuEvent"))
        if dev > 0 and not runtime:
            rows.append((e.key[:80], e.count, round(dev / 1e3, 4)))
    rows.sort(key=lambda r: -r[2])
    return {"device_ms_total": round(sum(r[2] for r in rows), 3), "kernels (name, calls, ms)": rows[:top]}


def kernels(llm, vocab: int, quick: bool, out: Path, traces: bool) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    engine = llm.engine
    rng = random.Random(9)
    rand = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    cold_len, shared = (2048, 2000) if not quick else (256, 240)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    res = {}
    a = rand(cold_len)
    llm.generate([a], one)
    for name, prompt in (("hit", a[:shared] + rand(cold_len - shared)), ("cold", rand(cold_len))):
        with tprofile(activities=acts) as prof:
            llm.generate([prompt], one)
            sync()
        res[name] = kernel_table(prof)
        if traces and name == "hit":
            prof.export_chrome_trace(str(out / "trace_hit.json"))
    # a batch-256 decode step (nano-like prompts, warm, then 3 steps profiled)
    n = 256 if not quick else 8
    prompts = [rand(rng.randint(100, 1024) if not quick else 16) for _ in range(n)]
    sp = SamplingParams(max_tokens=40 if not quick else 6, temperature=0.6, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"k{i}", p, sp)
    steps = 0
    while engine.has_unfinished():
        if steps == 20:
            with tprofile(activities=acts) as prof:
                for _ in range(3):
                    engine.step()
                sync()
            res["decode_bs256_x3"] = kernel_table(prof, 20)
            if traces:
                prof.export_chrome_trace(str(out / "trace_decode256.json"))
        engine.step()
        steps += 1
    return res


def run1(llm, prompts, outs) -> dict:
    """One workload run (prompts not cached): device ms per step from events around each launch."""
    engine = llm.engine
    cur: dict = {}
    marks: list = []
    sp = [SamplingParams(max_tokens=o, temperature=0.6, ignore_eos=True) for o in outs]
    stamps = []
    with step_timers(engine, cur, marks):
        for i, (p, s) in enumerate(zip(prompts, sp, strict=True)):
            engine.add_request(f"r1-{i}", p, s)
        sync()
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
            stamps.append(time.perf_counter())
        sync()
        wall = time.perf_counter() - t0
    dev = [(ev[0].elapsed_time(ev[1]) if ev else 0.0, seqs, tok) for ev, seqs, tok in marks]
    prompt_steps = [i for i, (_, s, t) in enumerate(dev) if t != s]
    last = prompt_steps[-1] if prompt_steps else -1
    t_end_prefill = stamps[min(last + 1, len(stamps) - 1)] if last >= 0 else t0
    return {
        "wall_s": round(wall, 4),
        "tok_s": round(sum(outs) / wall, 1),
        "steps": len(dev),
        "prompt_phase": {
            "steps": last + 1,
            "wall_s": round(t_end_prefill - t0, 4),
            "device_s": round(sum(d for d, _, _ in dev[: last + 1]) / 1e3, 4),
            "per_step_device_ms": [round(d, 2) for d, _, _ in dev[: last + 1]],
            "per_step_tokens": [t for _, _, t in dev[: last + 1]],
        },
        "decode_phase": {
            "steps": len(dev) - last - 1,
            "wall_s": round(stamps[-1] - t_end_prefill, 4),
            "device_s": round(sum(d for d, _, _ in dev[last + 1 :]) / 1e3, 4),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sections", default="ttft,kernels,run1,profile")
    ap.add_argument("--traces", action="store_true", help="chrome traces of the hit and a decode-256 step")
    ap.add_argument(
        "--prefill-config",
        default=None,
        help="A/B: a kernels.paged_prefill.SPLIT_CONFIGS name for every split step",
    )
    args = ap.parse_args()
    if args.prefill_config:  # (before the engine captures its graphs)
        from llmray.kernels import paged_prefill

        cfg = paged_prefill.SPLIT_CONFIGS[args.prefill_config]
        paged_prefill.PREFILL_SPLIT_CONFIG = paged_prefill.PREFILL_SPLIT_ONE_SEQ = cfg
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, cfg = build_model(args.quick)
    llm, startup = make_llm(model)
    res: dict = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "startup_s": startup}
    res["fuse_kv_store"] = llm.engine.runner.fuse_kv_store
    res["llmray"] = str(Path(sys.modules["llmray"].__file__).parent)  # (a baseline run: its checkout)
    pp = sys.modules.get("llmray.kernels.paged_prefill")
    res["prefill_split_config"] = repr(getattr(pp, "PREFILL_SPLIT_CONFIG", None))
    res["prefill_split_one_seq"] = repr(getattr(pp, "PREFILL_SPLIT_ONE_SEQ", None))
    res["command"] = "python " + " ".join(sys.argv)

    def save():
        (out / "latency.json").write_text(json.dumps(res, indent=2))

    n, lo, hi = (256, 100, 1024) if not args.quick else (12, 8, 48)
    prompts, outs = workload(n, lo, hi, cfg.vocab_size)
    llm.generate(
        workload(4, 16, 64, cfg.vocab_size, seed=1)[0], SamplingParams(max_tokens=8, ignore_eos=True)
    )
    for section in args.sections.split(","):
        t = time.perf_counter()
        if section == "ttft":
            res["latency"] = latency(llm, cfg.vocab_size, args.quick)
            res["ttft"] = ttft_breakdown(llm, cfg.vocab_size, args.quick, args.repeats)
        elif section == "kernels":
            res["kernels"] = kernels(llm, cfg.vocab_size, args.quick, out, args.traces)
        elif section.startswith("splits"):  # splits:8/16/4
            res["splits_ab"] = splits_ab(
                llm, cfg.vocab_size, args.quick, [int(v) for v in section[7:].split("/")]
            )
        elif section == "prefix":  # the prefix pair's medians over many rounds (an A/B's robust figure)
            res["prefix"] = prefix_pair(llm, cfg.vocab_size, args.quick, 21, rounds=args.repeats * 2)
            print(json.dumps(res["prefix"]), flush=True)
        elif section == "hostprof":
            res["hostprof"] = host_profile(llm, cfg.vocab_size, args.quick, args.repeats * 4)
        elif section == "lines":
            res["lines"] = line_times(llm, cfg.vocab_size, args.quick, args.repeats)
        elif section == "run1":
            res["run1"] = run1(llm, prompts, outs)
        elif section == "profile":
            res["profile"] = profile(llm, prompts, [min(o, 64) for o in outs])
        elif section == "ab_fuse":  # the same figures with the k/v store as its own launch (a fresh engine)
            import gc

            from llmray.engine import runner as runner_mod

            fused = llm.engine.runner.fuse_kv_store
            del llm
            gc.collect()
            torch.cuda.empty_cache() if CUDA else None
            runner_mod.FUSE_KV_STORE = not fused
            llm, startup = make_llm(model)
            llm.generate(
                workload(4, 16, 64, cfg.vocab_size, seed=1)[0], SamplingParams(max_tokens=8, ignore_eos=True)
            )
            res["ab_fuse"] = {"fuse_kv_store": not fused, "startup_s": startup}
            res["ab_fuse"]["latency"] = latency(llm, cfg.vocab_size, args.quick)
            res["ab_fuse"]["run1"] = {k: v for k, v in run1(llm, prompts, outs).items() if "phase" not in k}
        res.setdefault("section_s", {})[section] = round(time.perf_counter() - t, 2)
        print(f"{section}: {res['section_s'][section]} s", flush=True)
        if section.startswith("splits"):
            print(json.dumps(res["splits_ab"]), flush=True)
        save()
    print(json.dumps({k: v for k, v in res.items() if k != "kernels"}, indent=1)[:6000])


if __name__ == "__main__":
    main()
