"""Parts of the qwen3-0.6b training step alone: Muon's Newton-Schulz on its stacks (the
symmetric-kernel iteration, plain and Gram: ``llmray.kernels.newton_schulz``; timed and compared with an
fp32 iteration) and the q/k norm + rope backward per launch config. Run by ``bench/train_profile.py --ns``
/ ``--qk``; alone: ``python bench/train_ns.py`` (prints the JSON)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


NS_SHAPES = {(2048, 1024): 28, (1024, 1024): 56, (1024, 2048): 28, (3072, 1024): 56, (1024, 3072): 28}


def ns_fp32(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = (3.4445, -4.7750, 2.0315)
    tall = x.size(-2) > x.size(-1)
    x = x.mT if tall else x
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    for _ in range(steps):
        m = x @ x.mT
        x = a * x + (b * m + c * m @ m) @ x
    return x.mT if tall else x


def ns_bench(reps: int = 10, shapes: dict | None = None, device: str = "cuda") -> dict:
    """Muon's Newton-Schulz on qwen3-0.6b's stacks (one per weight shape) with the symmetric kernel, plain
    (``muon.NS_GRAM=0``) and Gram: ms per optimizer step (CUDA events) and the error against an fp32
    iteration (TF32 off) on 4 matrices of each stack, Gaussian and with singular values 1/k."""
    import llmray.train.muon as M  # noqa: N812

    shapes = shapes or NS_SHAPES
    torch.manual_seed(0)
    stacks = {sh: torch.randn(n, *sh, device=device).bfloat16() * 1e-3 for sh, n in shapes.items()}
    decay = {}
    for sh in shapes:
        r = min(sh)
        u = torch.linalg.qr(torch.randn(4, max(sh), r, device=device))[0]
        v = torch.linalg.qr(torch.randn(4, r, r, device=device))[0]
        m = u @ torch.diag_embed((1.0 / torch.arange(1, r + 1, device=device)).expand(4, r)) @ v.mT
        decay[sh] = (m if sh[0] >= sh[1] else m.mT).bfloat16() * 1e-3
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    refs = {k: {sh: ns_fp32(x[:4].float()) for sh, x in d.items()}
            for k, d in (("gauss", stacks), ("decay", decay))}  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = tf32
    res: dict = {}
    old = M.NS_GRAM
    for name, gram in (("sym", 0), ("gram", 1)):
        M.NS_GRAM = gram
        for _ in range(2):
            for x in stacks.values():
                M.zeropower_via_newtonschulz5(x, sym=True)
        per = {}
        for sh, x in stacks.items():
            t = _Timer(device)
            for _ in range(reps):
                M.zeropower_via_newtonschulz5(x, sym=True)
            per[f"{shapes[sh]}x{sh[0]}x{sh[1]}"] = round(t.ms() / reps, 3)
        errs = {}
        for k, d in (("gauss", stacks), ("decay", decay)):
            e = []
            for sh, x in d.items():
                o = M.zeropower_via_newtonschulz5(x[:4], sym=True).double()
                ref = refs[k][sh].double()
                e.append(((o - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))).max().item())
            errs[k] = [round(v, 4) for v in e]
        res[name] = {"ms": per, "total_ms": round(sum(per.values()), 2), "rel_err_vs_fp32": errs}
        log(f"ns {name}: {res[name]}")
    M.NS_GRAM = old
    res["configs_total_ms"] = ns_configs(stacks, reps, device)
    return res


NS_CONFIGS = [
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 4, 4),
    (128, 64, 8, 4),
    (64, 64, 4, 3),
]


def ns_configs(stacks: dict, reps: int, device: str) -> dict:
    """Muon's Newton-Schulz over all stacks (as it runs now) per ``sym_gram`` config (BM, BK, warps, stages)."""
    import llmray.kernels.newton_schulz as N  # noqa: N812
    import llmray.train.muon as M  # noqa: N812

    old, out = N.DEFAULT_CONFIG, {}
    for cfg in NS_CONFIGS:
        N.DEFAULT_CONFIG = cfg
        try:
            for x in stacks.values():
                M.zeropower_via_newtonschulz5(x, sym=True)
            t = _Timer(device)
            for _ in range(reps):
                for x in stacks.values():
                    M.zeropower_via_newtonschulz5(x, sym=True)
            out["/".join(map(str, cfg))] = round(t.ms() / reps, 3)
        except Exception as e:
            out["/".join(map(str, cfg))] = f"{type(e).__name__}: {str(e)[:120]}"
    N.DEFAULT_CONFIG = old
    log(f"ns configs: {out}")
    return out


# Muon's stacks of qwen3-0.6b by the wide orientation (muon.NS_GROUP_WIDE): q^T + o, k + v, gate^T + up^T + down
WIDE_SHAPES = {(1024, 2048): 56, (1024, 1024): 56, (1024, 3072): 84}
NS_MODULE = "llmray.kernels.newton_schulz"
# the Newton-Schulz path before this session's changes: stacks by exact shape, torch passes around the Gram
# iteration, the pointer kernel
OLD_FLAGS = {"muon.NS_GROUP_WIDE": 0, "muon.NS_NORM_PARTS": 0, "muon.NS_FOLD": 0, "muon.NS_GRAM_MIN_RATIO": 3,
             f"{NS_MODULE}.SYM_TMA": 0,
             f"{NS_MODULE}.SYM_TMA_OUT": 0, f"{NS_MODULE}.SYM_PERSIST": 0,
             f"{NS_MODULE}.DEFAULT_CONFIG": (128, 64, 4, 3)}  # fmt: skip
# sym_gram launch variants timed on the wide stacks: (name, flags)
SYM_VARIANTS = [
    ("ptr", {"SYM_TMA": 0}),
    ("tma", {"SYM_TMA": 1}),
    ("tma_s4", {"SYM_TMA": 1, "DEFAULT_CONFIG": (128, 64, 4, 4)}),
    ("tma_k128", {"SYM_TMA": 1, "DEFAULT_CONFIG": (128, 128, 4, 3)}),
    ("tma_k128_w8", {"SYM_TMA": 1, "DEFAULT_CONFIG": (128, 128, 8, 3)}),
    ("tma_out", {"SYM_TMA": 1, "SYM_TMA_OUT": 1}),
    ("tma_persist1", {"SYM_TMA": 1, "SYM_PERSIST": 1}),
    ("tma_persist2", {"SYM_TMA": 1, "SYM_PERSIST": 2}),
    # session 10: 8 warps (two warpgroups a 128 x 128 tile), deeper pipelines: all slower than "tma" (H200: 12.5-12.9
    # vs 11.16 ms, bench/results/train_ns_s10.json); a flattened persistent loop does not compile (Triton 3.6)
    ("tma_w8_s4", {"SYM_TMA": 1, "DEFAULT_CONFIG": (128, 64, 8, 4)}),
    ("tma_w8_s3", {"SYM_TMA": 1, "DEFAULT_CONFIG": (128, 64, 8, 3)}),
    ("tma_p1_w8_s4", {"SYM_TMA": 1, "SYM_PERSIST": 1, "DEFAULT_CONFIG": (128, 64, 8, 4)}),
]


class Flags:
    """Module attributes set for a block and restored after: {"muon.X": v, "llmray.kernels.m.Y": v}."""

    def __init__(self, flags: dict) -> None:
        import importlib

        self.items = []
        for path, v in flags.items():
            mod, attr = path.rsplit(".", 1)
            m = importlib.import_module(mod if mod.startswith("llmray") else f"llmray.train.{mod}")
            self.items.append((m, attr, v))

    def __enter__(self) -> Flags:
        self.old = [(m, a, getattr(m, a)) for m, a, _ in self.items]
        for m, a, v in self.items:
            setattr(m, a, v)
        return self

    def __exit__(self, *exc) -> None:
        for m, a, v in reversed(self.old):
            setattr(m, a, v)


def _ns_all(stacks: dict, norms: dict | None) -> dict:
    import llmray.train.muon as M  # noqa: N812

    return {sh: M.zeropower_via_newtonschulz5(x, sym=True, norm_sq=None if norms is None else norms[sh])
            for sh, x in stacks.items()}  # fmt: skip


def _first4(outs: dict) -> dict:
    """The first 4 matrices of each wide stack from a run's outputs (the 5-stack layout's q and gate
    stacks hold the transposes of the wide stacks' first matrices), fp64."""
    res = {}
    for w in WIDE_SHAPES:
        t = w[::-1]
        res[w] = (outs[t][:4].mT if t in outs and t != w else outs[w][:4]).double()
    return res


def _old_layout(wide: dict) -> dict:
    """The wide stacks' matrices as the 5 stacks by exact shape: (r, 2r) and (r, 3r) stacks' first 1/2 and
    2/3 as tall copies (q, gate + up), the rest as they are (o, down)."""
    k2, k1, k3 = WIDE_SHAPES
    n2, n3 = WIDE_SHAPES[k2] // 2, WIDE_SHAPES[k3] * 2 // 3
    w2, w3 = wide[k2], wide[k3]
    return {k2[::-1]: w2[:n2].mT.contiguous(), k1: wide[k1], k2: w2[n2:], k3[::-1]: w3[:n3].mT.contiguous(),
            k3: w3[n3:]}  # fmt: skip


def ns_sweep(reps: int = 5, device: str = "cuda", variants: list | None = None, rounds: int = 3) -> dict:
    """Newton-Schulz alone on the same matrices, before vs now: the 5 stacks by exact shape with the earlier
    path (``OLD_FLAGS``), and the 3 wide stacks (|X|^2 given, as the momentum pass writes it) per
    ``sym_gram`` launch variant and with the Gram iteration on the (1024, 2048) stack too
    (``NS_GRAM_MIN_RATIO=2``). Per case: ms per optimizer step (CUDA events; the cases interleaved over
    ``rounds`` rounds, the fastest round kept: the GPU's clock moves under its power cap), the relative error
    against an fp32 iteration (4 matrices of each stack) and the largest relative difference from the
    earlier path's output; ``best``: the fastest variant's module flags."""
    torch.manual_seed(0)
    wide = {sh: torch.randn(n, *sh, device=device).bfloat16() * 1e-3 for sh, n in WIDE_SHAPES.items()}
    old_stacks = _old_layout(wide)
    norms = {
        sh: torch.linalg.vector_norm(x, dim=(1, 2), dtype=torch.float32).square() for sh, x in wide.items()
    }
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    refs = {sh: ns_fp32(x[:4].float()).double() for sh, x in wide.items()}
    torch.backends.cuda.matmul.allow_tf32 = tf32
    kern_old = {k: v for k, v in OLD_FLAGS.items() if "kernels" in k}
    cases = [("before_5_stacks", OLD_FLAGS, old_stacks, None)]
    for name, flags in variants or SYM_VARIANTS:
        cases.append((name, {**kern_old, **{f"{NS_MODULE}.{k}": v for k, v in flags.items()}}, wide, norms))
    cases.append(
        ("tma_gram_ratio2", {**kern_old, f"{NS_MODULE}.SYM_TMA": 1, "muon.NS_GRAM_MIN_RATIO": 2}, wide, norms)
    )
    res: dict = {"cases": {}}
    before = None
    for name, flags, stacks, nrm in cases:  # compile, check
        t0 = time.perf_counter()
        try:
            with Flags(flags):
                outs = _first4(_ns_all(stacks, nrm))
            before = before or outs
            res["cases"][name] = {
                "rel_err_vs_fp32": {f"{sh[0]}x{sh[1]}": round(((o - refs[sh]).norm() / refs[sh].norm()).item(), 5)
                                    for sh, o in outs.items()},
                "max_rel_diff_vs_before": round(max(((o - before[sh]).norm() / before[sh].norm()).item()
                                                    for sh, o in outs.items()), 5),
                "compile_s": round(time.perf_counter() - t0, 1), "ms": {},
            }  # fmt: skip
        except Exception as e:
            res["cases"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        log(f"ns {name}: {res['cases'][name]}")
    for _ in range(rounds):
        for name, flags, stacks, nrm in cases:
            r = res["cases"][name]
            if "error" in r:
                continue
            with Flags(flags):
                _ns_all(stacks, nrm)
                for sh, x in stacks.items():
                    t = _Timer(device)
                    for _ in range(reps):
                        _ns_all({sh: x}, None if nrm is None else {sh: nrm[sh]})
                    key = f"{x.shape[0]}x{sh[0]}x{sh[1]}"
                    r["ms"][key] = round(min(r["ms"].get(key, 1e9), t.ms() / reps), 3)
    best = None
    for name, flags, _, _ in cases:
        r = res["cases"][name]
        if "ms" in r:
            r["total_ms"] = round(sum(r["ms"].values()), 3)
            log(f"ns {name}: {r['total_ms']} ms {r['ms']}")
            e0 = res["cases"]["before_5_stacks"].get("rel_err_vs_fp32", {})
            as_good = all(v <= 1.1 * e0.get(k, 0.0) + 1e-3 for k, v in r["rel_err_vs_fp32"].items())
            if name != "before_5_stacks" and as_good:  # not further from fp32 than before
                if best is None or r["total_ms"] < best[1]:
                    best = (name, r["total_ms"], flags)
    if best is not None:
        res["best"] = {"name": best[0], "total_ms": best[1],
                       "flags": "+".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, tuple) else v}"
                                         for k, v in best[2].items())}  # fmt: skip
    return res


QWEN_LAYER = [
    (2048, 1024),
    (1024, 1024),
    (1024, 1024),
    (1024, 2048),
    (3072, 1024),
    (3072, 1024),
    (1024, 3072),
]


def opt_bench(layers: int = 28, reps: int = 10, device: str = "cuda", new_flags: dict | None = None) -> dict:
    """Muon's step alone on qwen3-0.6b's hidden weights (``layers`` layers, fp32, overlapped passes, symmetric
    kernels): ms per step before (``OLD_FLAGS``) and now (the modules' defaults, or ``new_flags``), and after
    3 steps on the same gradients the largest difference of the weights (lr 0.02: an update is ~0.02 x O)."""
    from llmray.train.muon import MuonWithAuxAdam

    res: dict = {}
    finals = {}
    for name, flags in (("before", OLD_FLAGS), ("now", new_flags or {})):
        torch.manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(s, device=device) * 0.02)
            for _ in range(layers)
            for s in QWEN_LAYER
        ]
        opt = MuonWithAuxAdam([dict(params=params, use_muon=True, lr=0.02, weight_decay=0.1)])
        opt.ns_sym = True
        gen = torch.Generator(device=device).manual_seed(1)
        with Flags(flags):
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-3
                opt.step()
            finals[name] = [p.detach().clone() for p in params[: len(QWEN_LAYER) * 2]]
            t = _Timer(device)
            for _ in range(reps):
                opt.step()
            res[f"{name}_step_ms"] = round(t.ms() / reps, 3)
        log(f"opt {name}: {res[f'{name}_step_ms']} ms")
        del params, opt
        torch.cuda.empty_cache() if device == "cuda" else None
    diffs = [(a - b).abs().max().item() for a, b in zip(finals["before"], finals["now"], strict=True)]
    res["max_abs_weight_diff_3_steps"] = max(diffs)
    res["per_shape_max_abs_diff"] = [round(d, 7) for d in diffs[: len(QWEN_LAYER)]]
    return res


QK_CONFIGS = [{}, {"PROGRAMS_PER_SM": 4}, {"PROGRAMS_PER_SM": 16}, {"PROGRAMS_PER_SM": 200}, {"ROWS_BT": 2},
              {"ROWS_BT": 4, "PROGRAMS_PER_SM": 4}, {"NUM_WARPS": 8}, {"NUM_WARPS": 2},
              {"PROGRAMS_PER_SM": 200, "DW_SUM": None}, {"PROGRAMS_PER_SM": 64, "DW_SUM": None}]  # fmt: skip


def qk_bench(reps: int = 10, device: str = "cuda", shape: tuple = (8, 2048, 16, 8, 128)) -> dict:
    """The q/k norm + rope backward alone (``qkv_norm_rope_train`` on a fused (B, T, 32 x 128) row, as qwen3-0.6b
    trains) per launch config of ``llmray.kernels.qk_norm_rope_train``: ms per backward (incl. the dW sums
    and v's copy) for incoming gradients in (B, T, H, D) and in cuDNN's (B, H, T, D) layout; GB/s of the
    bytes it must move (q, k, dq_out, dk_out read; dq, dk written)."""
    import llmray.kernels.qk_norm_rope_train as QK  # noqa: N812
    from llmray.model.qwen3 import rope_tables

    b, t, hq, hk, d = shape
    torch.manual_seed(0)
    qkv = torch.randn(b, t, (hq + 2 * hk) * d, device=device, dtype=torch.bfloat16, requires_grad=True)
    qw = torch.ones(d, device=device, requires_grad=True)
    kw = torch.ones(d, device=device, requires_grad=True)
    cos, sin = (x.to(device) for x in rope_tables(d, t, 1e6))
    pos = torch.arange(t, device=device).expand(b, t)
    grads = {
        "bthd": [torch.randn(b, t, h, d, device=device, dtype=torch.bfloat16) for h in (hq, hk, hk)],
        "bhtd": [torch.randn(b, h, t, d, device=device, dtype=torch.bfloat16).transpose(1, 2) for h in (hq, hk, hk)],
    }  # fmt: skip
    moved = 2 * b * t * (hq + hk) * d * 3  # bytes: read x and dy, write dx (bf16)
    res: dict = {}
    keys = ("PROGRAMS_PER_SM", "ROWS_BT", "NUM_WARPS", "DW_SUM")  # DW_SUM None: torch's sum of the partials
    base = {k: getattr(QK, k) for k in keys}
    for cfg in QK_CONFIGS:
        name = ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"
        for k, v in {**base, **cfg}.items():
            setattr(QK, k, v)
        try:
            for layout, g in grads.items():
                for i in range(reps + 2):
                    if i == 2:
                        tm = _Timer(device)
                    out = QK.qkv_norm_rope_train(qkv, qw, kw, 1e-6, pos, cos, sin, hq, hk)
                    torch.autograd.backward(out, g)
                ms = tm.ms() / reps
                res[f"{name} {layout}"] = [round(ms, 4), round(moved / ms / 1e6)]
        except Exception as e:
            res[name] = f"{type(e).__name__}: {str(e)[:200]}"
        log(f"qk {name}: {[v for k, v in res.items() if k.startswith(name)]}")
    for k, v in base.items():
        setattr(QK, k, v)
    return res


class _Timer:
    """CUDA events on a GPU, the host clock elsewhere (the CPU check under the Triton interpreter)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.t = time.perf_counter()
        if self.cuda:
            self.a = torch.cuda.Event(enable_timing=True)
            self.a.record()

    def ms(self) -> float:
        if not self.cuda:
            return 1e3 * (time.perf_counter() - self.t)
        b = torch.cuda.Event(enable_timing=True)
        b.record()
        torch.cuda.synchronize()
        return self.a.elapsed_time(b)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Newton-Schulz / Muon step / q-k backward alone")
    p.add_argument("--parts", default="sweep,opt", help="sweep (NS variants), opt (Muon step), ns, qk")
    p.add_argument("--out", default="", help="JSON file; --best-flags FILE gets the best variant's flags")
    p.add_argument("--best-flags", default="")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    res: dict = {}
    parts = a.parts.split(",")
    if "sweep" in parts:
        res["ns_sweep"] = ns_sweep(a.reps)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))
        if a.best_flags and "best" in res["ns_sweep"]:
            Path(a.best_flags).write_text(res["ns_sweep"]["best"]["flags"])
    if "opt" in parts:
        best = res.get("ns_sweep", {}).get("best", {}).get("flags", "")
        flags = {}
        for f in filter(None, best.split("+")):
            k, v = f.split("=")
            flags[k] = tuple(int(x) for x in v.split("/")) if "/" in v else int(v)
        res["opt"] = opt_bench(reps=a.reps, new_flags=flags)
    if "ns" in parts:
        res["newton_schulz"] = ns_bench(a.reps)
    if "qk" in parts:
        res["qk_bwd"] = qk_bench(a.reps)
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
