"""Where a constrained step's time goes: host phases (perf_counter) and GPU time (CUDA events), the half-schema
batch of bench/structured.py next to the all-free batch, in one process.

Per ``step()`` call (steps holding ``--num`` rows only): host ms of launch (schedule + inputs + forward enqueue),
collect (the wait for the read-back), accept (every constrained row's ``accept_token`` + stop check), fill (the
step's ``fill_bitmasks``), sampler (the sampler's host time: its kernels enqueued), the rest; on CUDA the GPU ms
between consecutive launch ends (``gpu_step_ms``), the sampler's GPU ms (events around it) and the bubble before
each launch. Then a ``torch.profiler`` table of a few half-batch steps (CUDA kernels and CPU ops by time).

    python bench/structured_profile.py --tokenizer .data/bpe151k --out /tmp/prof            # H200
    python bench/structured_profile.py --preset tiny --num 32 --max-tokens 24 --out /tmp/p  # CPU check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from structured import SCHEMA, build_llm, load_tokenizer  # noqa: E402

import llmray.engine.engine as engine_mod  # noqa: E402
import llmray.engine.structured.batch as sbatch  # noqa: E402
import llmray.engine.structured.mask_worker as mask_worker  # noqa: E402
import llmray.engine.structured.step_masks as step_masks  # noqa: E402
import llmray.kernels.sampling as sampling_kernel  # noqa: E402
from llmray.engine.sampling_params import SamplingParams  # noqa: E402

CUDA = torch.cuda.is_available()
LAZY_OK = engine_mod.IncrementalDetokenizer


class EagerDetokenizer(LAZY_OK):  # type: ignore[misc,valid-type]
    """The detokenizer as before the lazy mode: two decodes per token in the read-back (A/B: eagerdetok)."""

    def __init__(self, tokenizer, prompt_ids, stop, lazy=False) -> None:
        super().__init__(tokenizer, prompt_ids, stop, False)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Probe:
    """Wraps the engine's step pieces with timers; ``rows`` is one dict per ``step()`` call."""

    def __init__(self, engine) -> None:
        self.engine, self.runner = engine, engine.runner
        self.rows: list[dict] = []
        self.cur: dict = {}
        self.marks: list = []  # per launch: (end event, seqs)
        self.sampler_events: list = []
        self._orig: list = []
        self.add_s = 0.0
        self.times: list = []  # per finish: (previous finish end, landed, fill done, finish start, end)
        self.flushed = 0.0

    def _wrap(self, obj, name: str, key: str, cuda_mark: str | None = None) -> None:
        fn = getattr(obj, name)
        self._orig.append((obj, name, fn))
        cur = self.cur

        def wrapped(*a, **k):
            ev0 = None
            if CUDA and cuda_mark:
                ev0 = torch.cuda.Event(enable_timing=True)
                ev0.record()
            t, c = time.perf_counter(), time.thread_time()
            out = fn(*a, **k)
            t1 = time.perf_counter()
            cur[key] = cur.get(key, 0.0) + t1 - t
            cur["cpu_" + key] = cur.get("cpu_" + key, 0.0) + time.thread_time() - c  # (the thread's CPU time)
            if key == "masks_finish":  # the timeline: this step's tokens landed / fill done (worker) vs now
                self.times.append((self.flushed, mask_worker._landed[0], mask_worker._done[0], t, t1))
                self.flushed = t1
            if CUDA and cuda_mark:
                ev1 = torch.cuda.Event(enable_timing=True)
                ev1.record()
                if cuda_mark == "launch":
                    self.marks.append((ev0, ev1, len(a[0]) if a else 0))
                else:
                    self.sampler_events.append((ev0, ev1))
            return out

        setattr(obj, name, wrapped)

    def __enter__(self) -> Probe:
        self._wrap(self.runner, "launch", "launch", "launch")
        self._wrap(self.runner, "collect", "collect")
        self._wrap(self.runner, "_sample", "sampler", "sampler")
        self._wrap(self.engine, "_check_constraint", "accept")
        self._wrap(self.engine, "_read_back", "read_back")
        self._wrap(sbatch, "fill_bitmasks", "fill")  # (on the mask thread when started early: its time)
        self._wrap(self.runner.masks, "start", "masks_start")
        self._wrap(self.runner.masks, "finish", "masks_finish")  # the wait for the mask thread + copy
        return self

    def __exit__(self, *exc) -> None:
        for obj, name, fn in reversed(self._orig):
            if isinstance(obj, type(sbatch)):
                setattr(obj, name, fn)
            else:
                delattr(obj, name)  # the instance attribute set by _wrap

    def run(self, prompts, params, tag: str) -> None:
        eng = self.engine
        t = time.perf_counter()
        for i, (p, s) in enumerate(zip(prompts, params, strict=True)):
            eng.add_request(f"{tag}-{i}-{time.monotonic_ns()}", p, s)
        self.add_s = time.perf_counter() - t
        while eng.has_unfinished():
            self.cur.clear()
            n = len(eng.scheduler.running)
            t, w = time.perf_counter(), self.runner.masks.work_s
            eng.step()
            self.cur["wall"] = time.perf_counter() - t
            self.cur["fill_worker"] = self.runner.masks.work_s - w  # the mask thread's busy time
            self.cur["running"] = n
            self.rows.append(dict(self.cur))
        _sync()


def summarize(probe: Probe, full: int, tokens: int, seconds: float) -> dict:
    keep = [r for r in probe.rows if r["running"] == full]
    n = max(1, len(keep))
    res: dict = {"steps": len(keep), "tok_s": round(tokens / seconds)}
    for k in (
        "fill_worker",
        "wall",
        "launch",
        "collect",
        "read_back",
        "accept",
        "fill",
        "sampler",
        "masks_start",
        "masks_finish",
    ):
        vals = [r.get(k, 0.0) * 1e3 for r in keep]
        res[f"{k}_ms"] = round(sum(vals) / n, 3)
        if k in ("wall", "fill", "accept", "masks_finish"):
            res[f"{k}_ms_p90"] = round(sorted(vals)[int(0.9 * (len(vals) - 1))], 3) if vals else 0.0
    res["other_host_ms"] = round(res["wall_ms"] - res["launch_ms"] - res["read_back_ms"], 3)
    for k in (
        "read_back",
        "launch",
        "masks_finish",
    ):  # the main thread's CPU time in each (wall - CPU: waits)
        res[f"cpu_{k}_ms"] = round(sum(r.get(f"cpu_{k}", 0.0) * 1e3 for r in keep) / n, 3)
    # the timeline of a deferred step (ms; medians over the run's full steps): its previous step's sampling
    # queued (F) -> that step's tokens land -> the worker's fill done; the host's arrival at the wait
    tl = [x for x in probe.times[1:] if x[1] > x[0] > 0 and x[2] >= x[1]]
    if tl:
        med = lambda v: round(statistics.median(v) * 1e3, 3)  # noqa: E731
        res["tl_land_after_flush_ms"] = med([x[1] - x[0] for x in tl])
        res["tl_fill_ms"] = med([x[2] - x[1] for x in tl])
        res["tl_arrive_after_land_ms"] = med([x[3] - x[1] for x in tl])
        res["tl_period_ms"] = med([x[4] - x[0] for x in tl])
        res["tl_waited_frac"] = round(sum(x[2] > x[3] for x in tl) / len(tl), 3)
    # the whole run: adding the requests, and the steps that did not hold the full batch (prefill, the end)
    rest = [r["wall"] * 1e3 for r in probe.rows if r["running"] != full]
    res["add_requests_ms"] = round(probe.add_s * 1e3, 1)
    res["other_steps"] = len(rest)
    res["other_steps_ms"] = round(sum(rest), 1)
    res["full_steps_ms"] = round(sum(r["wall"] for r in keep) * 1e3, 1)
    res["slowest_step_ms"] = round(max(r["wall"] for r in probe.rows) * 1e3, 1) if probe.rows else None
    if CUDA:
        steps, gaps = [], []
        for (_a0, a1, _s0), (b0, b1, s1) in zip(probe.marks, probe.marks[1:], strict=False):
            if s1 == full:
                steps.append(a1.elapsed_time(b1))
                gaps.append(max(0.0, a1.elapsed_time(b0)))
        res["gpu_step_ms"] = round(statistics.median(steps), 3) if steps else None
        samp = [a.elapsed_time(b) for a, b in probe.sampler_events]
        res["gpu_sampler_ms"] = round(statistics.median(samp), 3) if samp else None
    return res


def profile_table(llm, prompts, params, out: Path, steps: int = 6) -> None:
    """torch.profiler over ``steps`` steps of a full batch: tables by CUDA and by CPU time."""
    from torch.profiler import ProfilerActivity, profile

    eng = llm.engine
    for i, (p, s) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(f"prof-{i}-{time.monotonic_ns()}", p, s)
    for _ in range(4):  # prefill + a few decode steps first
        eng.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            eng.step()
        _sync()
    while eng.has_unfinished():
        eng.step()
    prof.export_chrome_trace(str(out.with_suffix(".trace.json")))  # (per-stream gaps: read it offline)
    ka = prof.key_averages()
    text = ""
    if CUDA:
        text += ka.table(sort_by="cuda_time_total", row_limit=25) + "\n"
    text += ka.table(sort_by="self_cpu_time_total", row_limit=30)
    out.write_text(text)


def kernel_check() -> str:
    """The in-place mask kernel against the torch ops on this device ("ok" or what went wrong)."""
    if not CUDA:
        return "ok"
    try:
        from llmray.kernels.token_bitmask import apply_token_bitmask_, apply_token_bitmask_torch

        g = torch.Generator(device="cuda").manual_seed(0)
        logits = torch.randn(6, 151_936, device="cuda", generator=g).to(torch.bfloat16)
        mask = torch.randint(-(2**31), 2**31 - 1, (6, 4748), device="cuda", dtype=torch.int32, generator=g)
        want = apply_token_bitmask_torch(logits, mask)
        got = apply_token_bitmask_(logits.clone(), mask)
        return "ok" if torch.equal(got, want) else "mismatch"
    except Exception as e:  # the bench goes on with the torch path
        return repr(e)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=".data/bpe151k")
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seeded", type=int, default=1, help="the profiled batch: 1 = per-request seeds")
    ap.add_argument("--variants", default="free,half,half+nodefer,half+oldmask,free+unseeded,half+unseeded")
    ap.add_argument("--profile-steps", type=int, default=6)
    ap.add_argument("--out", default="/tmp/structured_profile")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(args.tokenizer)
    llm = build_llm(tok, args.preset)
    eng = llm.engine
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(300, tok.vocab_size - 10, (args.prompt_len,), generator=gen).tolist()
        for _ in range(args.num)
    ]

    def params(i: int, schema: bool, seeded: bool, backend: str = "auto") -> SamplingParams:
        kw = {"structured_output": {"json": SCHEMA, "backend": backend}} if schema else {"ignore_eos": True}
        return SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i if seeded else None, **kw)

    w = min(8, args.num)
    llm.generate(prompts[:w], [params(i, i % 2 == 1, True) for i in range(w)])  # warm-up: grammar compile
    result: dict = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "command": "python " + " ".join(sys.argv),
        "runs": [],
    }
    sampler = eng.runner.sampler
    split_default, switch_default = sampling_kernel.TARGET_PROGRAMS, step_masks._SWITCH_S
    result["kernel_mask_check"] = kernel_check()
    try:  # the device wait's kernel (devwait) compiled now, not inside a profiled run
        from llmray.kernels.token_bitmask import wait_flag

        one = torch.ones(1, dtype=torch.int32, device="cuda" if CUDA else "cpu")
        wait_flag(one, 0, torch.zeros_like(one))
    except Exception as e:
        print("wait_flag failed:", repr(e), flush=True)
    if result["kernel_mask_check"] != "ok" and hasattr(sampler, "kernel_mask"):
        sampler.kernel_mask = False
        print("mask kernel check failed, torch path:", result["kernel_mask_check"], flush=True)
    for variant in [v for v in args.variants.split(",") if v]:
        # "free" | "half", then "+" flags (each switches one mechanism, as commented below): nodefer, oldmask,
        # unseeded, threadsN, oldseed, noearly, noevent, nosplit, switch100, noplan, noreuse, compact, xgrammar...
        kind, *flags = variant.split("+")
        seeded = "unseeded" not in flags
        backend = "xgrammar" if "xgrammar" in flags else "auto"
        batch = [params(i, kind == "half" and i % 2 == 1, seeded, backend) for i in range(args.num)]
        eng.defer_constrained_sampling = "nodefer" not in flags
        sampler.fused_seeded = "oldseed" not in flags
        eng.runner.masks.early = "noearly" not in flags
        eng.runner.masks.from_event = "noevent" not in flags  # fill started after the host read-back
        sampler.plan_ahead = "noplan" not in flags  # the sampler's host work after the wait for the masks
        eng.runner.masks.reuse = "noreuse" not in flags  # every step's fill laid out anew
        eng.runner.masks.side_copy = "noside" not in flags  # the main thread copies the masks after the wait
        default_wait = (eng.runner.masks.device_wait, eng.runner.masks.host_flag)
        if {"hostflag", "devflag", "nodevwait"} & set(flags):  # the device (host / device flag) or host waits
            eng.runner.masks.device_wait, eng.runner.masks.host_flag = (
                "nodevwait" not in flags,
                "devflag" not in flags,
            )
        engine_mod.IncrementalDetokenizer = EagerDetokenizer if "eagerdetok" in flags else LAZY_OK
        sampling_kernel.TARGET_PROGRAMS = 0 if "nosplit" in flags else split_default  # one program per row
        # the GIL switch interval while a fill runs: switchN = N us
        step_masks._SWITCH_S = next(
            (int(f[6:]) * 1e-6 for f in flags if f.startswith("switch")), switch_default
        )
        llg_json = dict(eng._grammars.backend("llguidance").json_defaults)
        if "compact" in flags:
            eng._grammars.backend("llguidance").json_defaults = {"whitespace_flexible": False}
            eng._grammars._cache.clear()
        if backend == "xgrammar" or "compact" in flags:
            llm.generate(prompts[:w], batch[:w])  # compile
        threads = next((int(f[7:]) for f in flags if f.startswith("threads")), None)
        llg = eng._grammars.backend("llguidance")
        default_executor = llg.executor
        if threads:
            import llguidance

            llg.executor = llguidance.LLExecutor(threads)
        if hasattr(sampler, "kernel_mask"):
            sampler.kernel_mask = "oldmask" not in flags and result["kernel_mask_check"] == "ok"
        _sync()
        t0, tokens0 = time.perf_counter(), eng.generation_tokens_total
        failed = None
        try:
            with Probe(eng) as probe:
                probe.run(prompts, batch, variant)
        except Exception as e:  # one variant's failure must not cost the others
            failed = repr(e)
            for _ in range(10_000):
                try:
                    for r in list(eng.requests):
                        eng.abort(r)
                    if not eng.has_unfinished():
                        break
                    eng.step()
                except Exception:
                    break
        finally:
            eng.defer_constrained_sampling = True
            sampler.fused_seeded = True
            eng.runner.masks.early = True
            eng.runner.masks.from_event = True
            sampler.plan_ahead = True
            eng.runner.masks.reuse = True
            eng.runner.masks.side_copy = True
            eng.runner.masks.device_wait, eng.runner.masks.host_flag = default_wait
            engine_mod.IncrementalDetokenizer = LAZY_OK
            sampling_kernel.TARGET_PROGRAMS, step_masks._SWITCH_S = split_default, switch_default
            if "compact" in flags:
                eng._grammars.backend("llguidance").json_defaults = llg_json
                eng._grammars._cache.clear()
            llg.executor = default_executor
            if hasattr(sampler, "kernel_mask"):
                sampler.kernel_mask = result["kernel_mask_check"] == "ok"
        dt = time.perf_counter() - t0
        if failed is not None:
            print("variant", variant, "failed:", failed, flush=True)
            result["runs"].append({"variant": variant, "error": failed})
            continue
        res = {"variant": variant, **summarize(probe, args.num, eng.generation_tokens_total - tokens0, dt)}
        result["runs"].append(res)
        print(time.strftime("%T"), json.dumps(res), flush=True)
        (out / "structured_profile.json").write_text(json.dumps(result, indent=1) + "\n")
    half = [params(i, i % 2 == 1, bool(args.seeded)) for i in range(args.num)]
    if args.profile_steps:
        profile_table(llm, prompts, half, out / "profile_half.txt", args.profile_steps)
        print(time.strftime("%T"), "profile written", flush=True)


if __name__ == "__main__":
    main()
