"""The prefix hit's host request path without a GPU, this checkout vs another, alternating processes.

    python bench/engine_host_ab.py --other .gpu/base_s6 --out DIR   # ~15 s, any machine

Times (us, min over repeats; one process per (checkout, round), alternating) the pure-host parts of a
2,048-token request after one sharing its first 2,000 tokens, and of the same request cold: the prompt's
encode + Sequence, ``schedule()`` (prefix lookup, block allocation), the step inputs of its one-sequence
chunk (``StepInputs.build`` on CPU buffers) and ``finish()`` (block registration, free); off_path: what
runs after the launch (the previous request's deferred block release, where the checkout has it). Host contention
moves both checkouts alike, so the A/B holds where end-to-end host spans are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child() -> dict:
    import random

    import torch

    from llmray.engine.engine import LLMEngine
    from llmray.engine.sampling_params import SamplingParams
    from llmray.engine.scheduler import Scheduler
    from llmray.engine.sequence import Sequence
    from llmray.engine.step_inputs import Layout, StepInputs, tile_capacity

    rng = random.Random(0)
    vocab, bs = 151936, 16
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    class _Cfg:  # what LLMEngine.encode reads
        vocab_size = vocab

    eng = LLMEngine.__new__(LLMEngine)
    eng.model_config, eng.tokenizer = _Cfg(), None
    res: dict[str, list[float]] = {}
    sched = Scheduler(20000, bs, 256, 8192, 40960)
    inputs = StepInputs(torch.device("cpu"), 400000, bs, 64, 2560)
    layout = Layout(64, 1, tile_capacity(64, 1, 64))

    def request(prompt: list[int], tag: str) -> None:
        t0 = time.perf_counter()
        encode = getattr(eng, "_encode", None)
        if encode is not None:
            ids, view = encode(prompt)
        else:
            ids, view = eng.encode(prompt), None
        seq = Sequence(tag, ids, one)
        if view is not None and hasattr(seq, "prompt_array"):
            seq.prompt_array = view
        sched.add(seq)
        t1 = time.perf_counter()
        out = sched.schedule()
        t2 = time.perf_counter()
        item = out.scheduled[0]
        lay = layout if item.num_new_tokens <= 64 else None
        inputs.build(out.scheduled, [0], lay, False)
        t3 = time.perf_counter()
        sched.advance(out)
        # (the engine releases finished requests' blocks after its next launch, off their latency)
        release = getattr(sched.block_manager, "release_deferred", None)
        if release is not None:
            release()
        t4 = time.perf_counter()
        sched.finish(seq, "length")
        inputs.rows.release(seq)
        t5 = time.perf_counter()
        for k, v in (("add", t1 - t0), ("schedule", t2 - t1), ("inputs", t3 - t2), ("finish", t5 - t4)):
            res.setdefault(f"{tag}_{k}_us", []).append(v * 1e6)
        res.setdefault(f"{tag}_off_path_us", []).append((t4 - t3) * 1e6)

    for _ in range(60):
        base = [rng.randrange(vocab) for _ in range(2048)]
        request(base, "cold")
        request(base[:2000] + [rng.randrange(vocab) for _ in range(48)], "hit")
    return {k: round(min(v[10:]), 1) for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", required=True, help="a checkout holding the llmray package (the baseline)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        import llmray

        print(json.dumps({"llmray": llmray.__file__, **child()}))
        return
    runs: dict[str, list[dict]] = {"this": [], "other": []}
    for _ in range(args.rounds):
        for name, src in (("this", REPO), ("other", Path(args.other).resolve())):
            env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--other", "-", "--child"]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd="/")
            if p.returncode:
                print(p.stderr[-2000:], flush=True)
                continue
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
    table = {
        name: {k: v if k == "llmray" else statistics.median(r[k] for r in rows) for k, v in rows[0].items()}
        for name, rows in runs.items()
        if rows
    }
    res = {"rounds": args.rounds, "us (median over rounds of the min over repeats)": table}
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "host_ab.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
