"""Where one qwen3-0.6b 8 x 2,048 bf16 training step goes, our kernels vs torch.compile only.

One process, one GPU, the variants one after the other (``llmray.train.throughput.build_step``: the step
``bench/train.py --parts c`` times). Per variant:
- ``step_ms``: the whole step (forward, backward, clipping, optimizer) by CUDA events over ``--steps`` steps,
  each step's time too (spread), with the GPU's SM clock / power / utilisation (nvidia-smi, every 100 ms,
  every GPU of the host: the other lane's GPU shows whether it was busy) and the host's CPU load meanwhile;
- ``regions_ms``: the same step cut by CUDA events into forward (with the loss), backward, clip norm and
  optimizer step, run eagerly (no graph; GPU kernels are the same, the launches are not) and, for a graphed
  variant, graphed (forward + backward as one replay);
- ``profile``: one step of each under torch.profiler: per region the GPU kernel time, busy union and idle,
  kernel time by category (GEMM, attention, our Triton kernels, Newton-Schulz's symmetric kernel, torch
  elementwise, inductor, memcpy/memset) and the top kernels.
Variants are ``kernels:mode[:flag+flag]``: flags set module attributes (``muon.NS_GRAM=1``) for A/B runs
in the same process. Writes OUT/profile.json after every variant.

    python bench/train_profile.py --out DIR [--variants triton:graphs,torch:blocks] [--steps 8]
    python bench/train_profile.py --smoke --out /tmp/tp      # CPU plumbing check (tiny preset, no profile)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmray.config import ModelConfig  # noqa: E402
from llmray.train.harness import autocast  # noqa: E402
from llmray.train.metrics import mfu  # noqa: E402
from llmray.train.throughput import build_step  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from train_ns import ns_bench, qk_bench  # noqa: E402
from train_smi import Smi  # noqa: E402

T0 = time.perf_counter()
CATEGORIES = [  # (name, pattern on the kernel name), first match wins
    ("ns_sym", r"_sym_gram"), ("gemm", r"nvjet|gemm|cutlass|xmma|cublas"),
    ("attention", r"cudnn|flash|fmha|sdpa"), ("inductor", r"^triton_"),
    ("optim_ours", r"^_momentum_kernel|^_apply_kernel"), ("adamw", r"adam|multi_tensor"),
    ("torch_elementwise", r"at::|at_cuda|^void "), ("ours_triton", r"^_"),
]  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def category(name: str, cat: str) -> str:
    if cat != "kernel":
        return cat  # gpu_memcpy, gpu_memset
    return next((c for c, pat in CATEGORIES if re.search(pat, name)), "other")


def timed_steps(s, steps: int, cuda: bool) -> dict:
    for _ in range(4 if s.graphs is not None else 3):
        s.step()
    per = []
    with Smi() as smi:
        for _ in range(
            3
        ):  # untimed: nvidia-smi's start (NVML set-up) stalls the GPU once (W1: +20 ms a step)
            s.step()
        for _ in range(steps):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            t = time.perf_counter()
            s.step()
            if cuda:
                b.record()
            per.append((a, b) if cuda else time.perf_counter() - t)
        if cuda:
            torch.cuda.synchronize()
    ms = [p[0].elapsed_time(p[1]) if cuda else 1e3 * p for p in per]
    return {
        "step_ms": round(sum(ms) / len(ms), 2),
        "steps_ms": [round(x, 2) for x in ms],
        "smi": smi.summary(),
    }


def region_step(s, graphed: bool, cuda: bool, mark=None) -> list:
    """One step as ``harness.train_step`` runs it (clipping folded into Muon's passes), with a CUDA event
    (and a profiler range if ``mark``) per region; returns [(name, start, end)]."""
    mark = mark or (lambda name: contextlib.nullcontext())
    ev = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else (lambda: None)
    ids, tg = s.x[:, :-1], s.x[:, 1:]
    dev = s.x.device
    out = []

    def region(name, fn):
        a, b = ev(), ev()
        if a is not None:
            a.record()
        with mark(name):
            r = fn()
        if b is not None:
            b.record()
        out.append((name, a, b))
        return r

    if graphed:
        region("fwd_bwd_graph", lambda: s.graphs.fwd_bwd(ids, tg, 1))
    else:

        def fwd():
            with autocast(dev, s.dtype):
                return s.model(ids, targets=tg)

        loss = region("forward", fwd)
        region("backward", loss.backward)
    grads = [p.grad for p in s.params if p.grad is not None]
    scale = region(
        "clip_norm",
        lambda: (1.0 / (torch.nn.utils.get_total_norm(grads, 2.0, foreach=True) + 1e-6)).clamp(max=1.0),
    )
    region("optimizer", lambda: s.opt.step(grad_scale=scale))
    s.opt.zero_grad(set_to_none=True)
    return out


def regions(s, graphed: bool, cuda: bool, reps: int = 3) -> dict:
    acc: dict[str, list[float]] = {}
    for _ in range(reps):
        marks = region_step(s, graphed, cuda)
        if cuda:
            torch.cuda.synchronize()
        for name, a, b in marks:
            acc.setdefault(name, []).append(a.elapsed_time(b) if cuda else 0.0)
    return {k: round(sorted(v)[len(v) // 2], 2) for k, v in acc.items()}  # median


def profile(s, graphed: bool) -> dict:
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as tprofile

    with tprofile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=not graphed
    ) as prof:
        region_step(s, graphed, True, mark=lambda n: record_function("R:" + n))
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/t.json")
        evs = json.loads(Path(f"{d}/t.json").read_text())["traceEvents"]
    return summarize(evs, gemms=not graphed)


def summarize(evs: list, gemms: bool) -> dict:
    """Per profiler range ("R:<region>"): kernel time, busy union, categories, top kernels (+ the GEMM table)."""
    kern = [e for e in evs if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    anns = [
        e for e in evs if e.get("cat") == "gpu_user_annotation" and str(e.get("name", "")).startswith("R:")
    ]
    res: dict = {"gemms": gemm_table(evs, kern)} if gemms else {}
    spans = [(a["name"][2:], a["ts"], a["ts"] + a["dur"]) for a in anns]
    if not spans and kern:  # no GPU-side ranges: the whole step as one
        spans = [("step", min(k["ts"] for k in kern), max(k["ts"] + k["dur"] for k in kern))]
    got = {n: (a, b) for n, a, b in spans}
    if "clip_norm" in got and kern:  # ranges the profiler leaves out: autograd's thread, the optimizer's
        if "optimizer" not in got:
            spans.append(("optimizer", got["clip_norm"][1], max(k["ts"] + k["dur"] for k in kern)))
        if "backward" not in got and "forward" in got:
            spans.append(("backward", got["forward"][1], got["clip_norm"][0]))
    for name, t0, t1 in spans:
        ks = sorted(
            (k for k in kern if k["ts"] >= t0 - 1 and k["ts"] + k["dur"] <= t1 + 1), key=lambda k: k["ts"]
        )
        busy, end = 0.0, -1e30
        for k in ks:  # union of kernel intervals (streams overlap)
            a, b = k["ts"], k["ts"] + k["dur"]
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        cats: dict[str, float] = {}
        per_stream: dict[str, float] = {}
        for k in ks:
            per_stream[str(k.get("tid"))] = per_stream.get(str(k.get("tid")), 0.0) + k["dur"] / 1e3
        top: dict[str, list] = {}
        for k in ks:
            c = category(k["name"], k["cat"])
            cats[c] = cats.get(c, 0.0) + k["dur"] / 1e3
            t = top.setdefault(k["name"][:90], [0, 0.0])
            t[0] += 1
            t[1] += k["dur"] / 1e3
        res[name] = {
            "span_ms": round((t1 - t0) / 1e3, 2), "busy_ms": round(busy / 1e3, 2),
            "kernel_ms": round(sum(k["dur"] for k in ks) / 1e3, 2), "n_kernels": len(ks),
            "streams_ms": {t: round(v, 2) for t, v in per_stream.items()},
            "by_category_ms": {c: round(v, 2) for c, v in sorted(cats.items(), key=lambda x: -x[1])},
            "top": [[n, c, round(v, 3)] for n, (c, v) in sorted(top.items(), key=lambda x: -x[1][1])[:45]],
        }  # fmt: skip
    return res


MM_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::addmm_",
    "aten::bmm",
    "aten::baddbmm",
    "aten::matmul",
    "aten::linear",
}


def gemm_table(evs: list, kern: list) -> list:
    """GEMM kernel time per (op, input shapes) with its TFLOP/s (kernels matched to their op by External id;
    eager steps only: a graph replay has no ops)."""
    ops = {}
    for e in evs:
        args = e.get("args") or {}
        if e.get("cat") == "cpu_op" and e.get("name") in MM_OPS and args.get("Input Dims"):
            ops[args.get("External id")] = (e["name"], args["Input Dims"])
    acc: dict[str, list] = {}
    for k in kern:
        if category(k["name"], k["cat"]) != "gemm":
            continue
        op = ops.get((k.get("args") or {}).get("External id"))
        mats = [d for d in op[1] if isinstance(d, list) and len(d) >= 2][-2:] if op else []
        flops = 2 * float(torch.tensor(mats[0]).prod()) * mats[1][-1] if len(mats) == 2 else 0.0
        a = acc.setdefault(f"{op[0]} {mats}" if op else "unattributed", [0, 0.0, 0.0])
        a[0], a[1], a[2] = a[0] + 1, a[1] + k["dur"] / 1e3, a[2] + flops
    rows = sorted(acc.items(), key=lambda x: -x[1][1])[:30]
    return [[key, n, round(ms, 3), round(fl / (ms * 1e-3) / 1e12, 1) if ms and fl else None]
            for key, (n, ms, fl) in rows]  # fmt: skip


def set_flags(flags: str) -> list:
    """``module.ATTR=value`` pairs joined by '+' (value: int, float or text; module: ``muon`` means
    ``llmray.train.muon``); returns [(module, attr, old value)] for ``restore``."""
    old = []
    for f in filter(None, flags.split("+")):
        path, val = f.split("=")
        mod, attr = path.rsplit(".", 1)
        m = importlib.import_module(mod if mod.startswith("llmray") else f"llmray.train.{mod}")
        old.append((m, attr, getattr(m, attr)))
        v: object = tuple(int(x) for x in val.split("/") if x) if "/" in val else val  # 2/4 -> (2, 4)
        v = None if v == "None" else v
        for conv in (int, float) if isinstance(v, str) else ():
            with contextlib.suppress(ValueError):
                v = conv(val)
                break
        setattr(m, attr, v)
    return old


def restore(old: list) -> None:
    for m, attr, v in reversed(old):
        setattr(m, attr, v)


def train_check(variants: list[str], steps: int = 12) -> dict:
    """The same ``steps`` training steps (one fixed batch, same init) per variant: losses and how far a
    weight (layer 0's gate|up, layer 27's o_proj) ends from the first variant's."""
    mc = ModelConfig.preset("qwen3-0.6b")
    res: dict = {}
    first: dict[str, torch.Tensor] = {}
    for v in variants:
        kernels, mode, *rest = v.split(":")
        old = set_flags(rest[0] if rest else "")
        try:
            s = build_step(mc, kernels, mode, 8, 2048, "cuda")
            losses = [round(float(s.step()), 4) for _ in range(steps)]
            w = {n: p.detach().float().clone() for n, p in s.model.named_parameters()
                 if n.endswith(("layers.0.mlp.gate_proj.weight", "layers.27.self_attn.o_proj.weight"))}  # fmt: skip
            diff = {n: round(((w[n] - first[n]).norm() / first[n].norm()).item(), 6) for n in w if n in first}
            first = first or w
            res[v] = {"losses": losses, "weight_rel_diff_vs_first": diff}
            log(f"check {v}: {res[v]}")
        finally:
            restore(old)
            s = None
            torch.cuda.empty_cache()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="triton:graphs,torch:blocks")
    p.add_argument("--timed", default="", help="more variants, timed steps only (no regions, no profile)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-smi", action="store_true", help="no nvidia-smi polling during the timed steps")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--ns", action="store_true", help="first: Newton-Schulz alone, plain vs Gram")
    p.add_argument("--qk", action="store_true", help="first: the q/k norm + rope backward per launch config")
    p.add_argument(
        "--check", default="", help="variants to train 12 steps each from one init (losses, weights)"
    )
    p.add_argument("--check-steps", type=int, default=12, help="training steps per --check variant")
    p.add_argument("--out", default="/tmp/train_profile")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny preset, small batch, no profiler")
    a = p.parse_args()
    cuda = torch.cuda.is_available() and not a.smoke
    Smi.ENABLED = not a.no_smi
    device = "cuda" if cuda else "cpu"
    preset, bsz, seq = ("tiny", 2, 64) if a.smoke else ("qwen3-0.6b", 8, 2048)
    torch.backends.cuda.matmul.allow_tf32 = True
    mc = ModelConfig.preset(preset)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                 "shape": [bsz, seq], "preset": preset, "variants": {}}  # fmt: skip
    for flag, key, fn in ((a.ns, "newton_schulz", ns_bench), (a.qk, "qk_bwd", qk_bench)):
        if flag and cuda:
            try:
                res[key] = fn()
            except Exception as e:  # keep going: the step profile matters more
                res[key] = f"{type(e).__name__}: {str(e)[:400]}"
            (out / "profile.json").write_text(json.dumps(res, indent=1, default=str))

    def run(v: str, full: bool) -> None:
        s = None
        kernels, mode, *rest = v.split(":")
        old = set_flags(rest[0] if rest else "")
        try:
            s = build_step(mc, kernels, mode if cuda else "none", bsz, seq, device)
            r = timed_steps(s, a.steps, cuda)
            r["mfu"] = round(mfu(bsz * seq / (r["step_ms"] / 1e3), mc, seq), 4)
            r["tokens_per_s"] = round(bsz * seq / (r["step_ms"] / 1e3))
            r["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None
            log(f"{v}: step {r['step_ms']} ms, mfu {r['mfu']}, {r['steps_ms']}")
            graphed = s.graphs is not None and full
            r["regions_ms"] = {"eager": regions(s, False, cuda)} if full else {}
            if graphed:
                r["regions_ms"]["graphed"] = regions(s, True, cuda)
            log(f"{v}: regions {r['regions_ms']}")
            if cuda and full and not a.no_profile:
                r["profile"] = {}
                for mode_ in ("eager", "graphed") if graphed else ("eager",):
                    try:  # a failed profile keeps the timings above
                        r["profile"][mode_] = profile(s, mode_ == "graphed")
                    except Exception as e:
                        r["profile"][mode_] = {
                            "error": {"busy_ms": 0, "span_ms": 0, "by_category_ms": repr(e)}
                        }
                for mode_, pr in r["profile"].items():
                    log(f"{v} {mode_}: " + "; ".join(f"{n}: busy {x['busy_ms']}/{x['span_ms']} ms "
                                                      f"{x['by_category_ms']}" for n, x in pr.items()
                                                      if isinstance(x, dict)))  # fmt: skip
        except Exception as e:  # report it, keep the other variants
            import traceback

            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        finally:
            restore(old)
        n = sum(k.split("#")[0] == v for k in res["variants"])
        res["variants"][v if n == 0 else f"{v}#{n + 1}"] = r  # a repeated variant keeps each run
        (out / "profile.json").write_text(json.dumps(res, indent=1, default=str))
        s = None  # noqa: F841  (frees the model before the next variant)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    for v in filter(None, a.variants.split(",")):
        run(v, True)
    if a.check and cuda:
        res["check"] = train_check(a.check.split(","), a.check_steps)
        (out / "profile.json").write_text(json.dumps(res, indent=1, default=str))
    for v in filter(None, a.timed.split(",")):
        run(v, False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
