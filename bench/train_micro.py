"""Two parts of the qwen3-0.6b training step alone, new against old, side by side in one process (GPU):

- ``qk``: the q/k RMSNorm + rope backward of one layer (``qkv_norm_rope_train``'s backward: dq, dk, v's
  gradient into the fused q|k|v gradient, both weights' gradients) on 8 x 2,048 tokens, 16 / 8 heads x 128,
  with the incoming gradients cuDNN's SDPA backward really returns (their layouts). Per variant: the error
  against torch's fp32 autograd of rope(rms_norm(.)) and the time per call (20 calls in one CUDA graph,
  replayed; CUDA events, median of 5 replays), the GB/s of the bytes it must move and whether the fused
  gradient has the first variant's bits. Variants: the committed kernel (``--old``: a copy of the previous
  module), the one-head row kernel ("rows", the default before session 9: the baseline when no --old), the
  token-range design, the head-group kernel ("groups": tokens x heads a program, prefetch, eviction hints) and
  the tensor-descriptor kernel ("tma": programs per SM, tokens an item, warps, pipeline stages); then the
  baseline and the fastest correct "groups"/"tma" config side by side on both incoming-gradient layouts
  (cuDNN's (B, T, H, D) and a (B, H, T, D) one), twice, alternating ("ab"). (W1 2026-12-01 also ran a tile
  kernel, BT tokens x all heads a program, since removed: 0.30-0.51 ms against the row kernel's 0.142.)
- ``optim``: Muon + AdamW's step over qwen3-0.6b's parameters (bf16 shadows, symmetric Newton-Schulz, as
  training runs it) with the momentum / apply passes one launch per shape group (``optim_kernels.MULTI``)
  or one per matrix: GPU ms per step (CUDA events), host ms per step, and whether both give the same weights.

Writes OUT/micro.json after each part and OUT/best_flags.txt (the fastest correct "groups"/"tma" config as
``bench/train_profile.py`` flags).

    python bench/train_micro.py --out DIR [--old .gpu/jobs/training_base/qk_norm_rope_train_old.py]
    python bench/train_micro.py --smoke --out /tmp/tm   # CPU: small shapes under the Triton interpreter
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
T0 = time.perf_counter()
QK_MOD = "llmray.kernels.qk_norm_rope_train"
GKEYS = ("BT", "HG", "WARPS", "PREFETCH", "EVICT")
TKEYS = ("BT", "STAGES", "WARPS", "PER_SM", "HG", "MAXNREG")
# (ROWS_BT, warps or None, COPY_V) of the one-head row kernel ("rows": the committed default before the head-group
# kernel; "rows bt32 wauto" is the old kernel in the A/B)
ROWS = [(32, None, True), (16, None, True), (64, None, True), (32, 8, True), (32, None, False)]  # fmt: skip
# (GROUP_BT, GROUP_HG, GROUP_WARPS, GROUP_PREFETCH, GROUP_EVICT) of the head-group kernel ("groups")
GROUPS = [(32, 4, 4, True, False), (16, 4, 4, True, False), (16, 8, 4, True, False), (32, 2, 4, True, False),
          (32, 4, 8, True, False), (16, 2, 2, True, False), (32, 4, 4, False, False), (32, 4, 4, True, True)]  # fmt: skip
# (TMA_BT, TMA_STAGES, TMA_WARPS, TMA_PER_SM, TMA_HG, TMA_MAXNREG) of the tensor-descriptor design ("tma")
TMAS = [(32, 3, 4, 2, 1, None), (16, 3, 4, 4, 1, 128), (16, 4, 4, 4, 1, 128), (16, 3, 4, 3, 2, 168),
        (16, 3, 4, 4, 2, 128), (32, 3, 4, 3, 1, 168), (16, 3, 4, 2, 2, None), (32, 3, 4, 2, 2, None),
        (16, 3, 4, 2, 4, None), (16, 2, 4, 4, 2, 128), (32, 2, 4, 3, 1, 168), (16, 3, 4, 4, 1, None)]  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def graph_ms(fn, calls: int, cuda: bool) -> float:
    """ms per call of ``fn``: ``calls`` calls captured in one CUDA graph, median of 5 replays (CPU: wall)."""
    if not cuda:
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    ms = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ms.append(a.elapsed_time(b) / calls)
    return statistics.median(ms)


class _Grab(torch.autograd.Function):
    """Identity whose backward keeps the incoming gradients as they arrive (cuDNN's layouts)."""

    @staticmethod
    def forward(ctx, box: list, *xs: torch.Tensor):
        ctx.box = box
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *gs: torch.Tensor):
        ctx.box.extend(gs)
        return (None, *gs)


def qk_part(
    shape: tuple,
    cuda: bool,
    old_path: str | None,
    quick: bool = False,
    designs: str = "rows,token,groups,tma",
) -> tuple[dict, str]:
    import llmray.kernels.qk_norm_rope_train as QK  # noqa: N812
    from llmray.kernels.reference import rms_norm_ref, rope_ref
    from llmray.model.attention import causal_attention
    from llmray.model.qwen3 import rope_tables

    dev = "cuda" if cuda else "cpu"
    b, t, hq, hk, d = shape
    torch.manual_seed(0)
    qkv = torch.randn(b, t, (hq + 2 * hk) * d, device=dev, dtype=torch.bfloat16)
    qw = (1 + 0.1 * torch.randn(d, device=dev)).requires_grad_(True)
    kw = (1 + 0.1 * torch.randn(d, device=dev)).requires_grad_(True)
    cos, sin = (x.to(dev) for x in rope_tables(d, t, 1e6))
    pos = torch.arange(t, device=dev).expand(b, t)
    # the incoming gradients as SDPA's backward returns them (cuDNN on the H200)
    box: list = []
    x = qkv.clone().requires_grad_(True)
    q, k, v = QK.qkv_norm_rope_train(x, qw, kw, 1e-6, pos, cos, sin, hq, hk)
    q, k, v = _Grab.apply(box, q, k, v)
    out = causal_attention(q, k, v, d**-0.5)
    out.backward(torch.randn_like(out))
    dqo, dko, dv = (g.detach() for g in box)
    res: dict = {"layouts": {n: list(g.stride()) for n, g in zip(("dq", "dk", "dv"), box, strict=True)}}
    log(f"qk: incoming gradient strides {res['layouts']}")
    # torch's fp32 reference
    ref = [y.detach().float().requires_grad_(True) for y in (qkv, qw, kw)]
    qr, kr, vr = ref[0].split([hq * d, hk * d, hk * d], dim=-1)
    qo_r, ko_r = rope_ref(rms_norm_ref(qr.reshape(b, t, hq, d), ref[1], 1e-6),
                          rms_norm_ref(kr.reshape(b, t, hk, d), ref[2], 1e-6), pos, cos, sin)  # fmt: skip
    torch.autograd.backward((qo_r, ko_r, vr.reshape(b, t, hk, d)), (dqo.float(), dko.float(), dv.float()))
    want = [r.grad for r in ref]
    del qo_r, ko_r, qr, kr, vr, ref, x, q, k, v, out, box
    moved = (
        2 * b * t * d * (hq + hk + hq + hk + hk + hq + hk + hk)
    )  # read q k dq dk dv, write dq dk dv (bf16)
    mods = {"new": QK}
    if old_path:
        spec = importlib.util.spec_from_file_location("qk_old", old_path)
        assert spec is not None and spec.loader is not None
        mods["old"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods["old"])
    keys = (
        "BWD",
        "COPY_V",
        "ROWS_BT",
        "ROWS_WARPS",
        *(f"GROUP_{k}" for k in GKEYS),
        *(f"TMA_{k}" for k in TKEYS),
    )
    base = {k: getattr(QK, k) for k in keys}
    variants: list[tuple[str, str, dict]] = [("old (committed)", "old", {})] if old_path else []
    for bt, w, cv in ROWS[:1] if quick else ROWS:
        cfg = {"BWD": "rows", "ROWS_BT": bt, "ROWS_WARPS": w, "COPY_V": cv}
        variants.append((f"rows bt{bt} w{w or 'auto'}{'' if cv else ' vapart'}", "new", cfg))
    if not quick and "token" in designs:
        variants.append(("token", "new", {"BWD": "token"}))
    for g in GROUPS if "groups" in designs else []:
        cfg = {"BWD": "groups", "COPY_V": True, **{f"GROUP_{k}": v_ for k, v_ in zip(GKEYS, g, strict=True)}}
        variants.append(("groups bt{} hg{} w{}{}{}".format(*g[:3], "" if g[3] else " noprefetch", " evict" if g[4] else ""),
                         "new", cfg))  # fmt: skip
    for g in TMAS if "tma" in designs else []:
        cfg = {"BWD": "tma", "COPY_V": True, **{f"TMA_{k}": v_ for k, v_ in zip(TKEYS, g, strict=True)}}
        variants.append(("tma bt{} ns{} w{} per_sm{} hg{} maxnreg{}".format(*g), "new", cfg))
    # the incoming gradients in a (B, H, T, D) layout (the tests' other layout): the same values
    tr = {
        "bthd": (dqo, dko, dv),
        "bhtd": tuple(g.transpose(1, 2).contiguous().transpose(1, 2) for g in (dqo, dko, dv)),
    }
    best, best_ms, first, best_cfg = "", float("inf"), None, {}
    ctx = SimpleNamespace(saved_tensors=(qkv, qw, kw, pos, cos, sin), needs_input_grad=(True,) * 9,
                          heads=(hq, hk, d), eps=1e-6, w_index=1)  # fmt: skip

    def run(mod, name, layout):
        gs = tr[layout]
        got = mod._QKVNormRopeFn.backward(ctx, *gs)
        err = [round(((g.float() - w_).abs().max() / w_.abs().max()).item(), 5)
               for g, w_ in zip(got[:3], want, strict=True)]  # fmt: skip
        ms = graph_ms(lambda: mod._QKVNormRopeFn.backward(ctx, *gs), 20 if cuda else 1, cuda)
        return got, {"ms": round(ms, 4), "gb_s": round(moved / ms / 1e6), "err_dqkv_dqw_dkw": err,
                     "ok": err[0] < 2e-2 and max(err[1:]) < 1e-2}  # fmt: skip

    for name, which, cfg in variants:
        for k, v_ in {**base, **cfg}.items():
            setattr(QK, k, v_)
        try:
            got, res[name] = run(mods[which], name, "bthd")
            first = got[0] if first is None else first  # the first variant's dqkv: the baseline's bits
            res[name]["dqkv_bit_identical_to_first"] = bool(torch.equal(got[0], first))
            if (
                which == "new"
                and cfg.get("BWD") in ("groups", "tma")
                and res[name]["ok"]
                and res[name]["ms"] < best_ms
            ):
                best, best_ms = name, res[name]["ms"]
                res["best_flags"] = "+".join(
                    f"{QK_MOD}.{k}={int(v_) if isinstance(v_, bool) else v_}" for k, v_ in cfg.items()
                )
                best_cfg = cfg
        except Exception as e:  # keep the other variants
            res[name] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"qk {name}: {res[name]}")
    # both layouts for the baseline and the best head-group config, side by side (alternating)
    pairs = [(variants[0][0], variants[0][1], variants[0][2])] + ([(best, "new", best_cfg)] if best else [])
    for rep in range(2):
        for name, which, cfg in pairs:
            for layout in ("bthd", "bhtd"):
                for k, v_ in {**base, **cfg}.items():
                    setattr(QK, k, v_)
                try:
                    got, r = run(mods[which], name, layout)
                    r["dqkv_bit_identical_to_first"] = bool(torch.equal(got[0], first))
                except Exception as e:
                    r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                res.setdefault("ab", {})[f"{name} | {layout} | rep{rep}"] = r
                log(f"qk A/B {name} | {layout} | rep{rep}: {r}")
    for k, v_ in base.items():
        setattr(QK, k, v_)
    res["best"] = best
    return res, res.get("best_flags", "")


def optim_part(preset: str, cuda: bool, steps: int) -> dict:
    import llmray.train.optim_kernels as OK  # noqa: N812
    from llmray.config import ModelConfig
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.train.loop import build_optimizer

    dev = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen3ForCausalLM(ModelConfig.preset(preset), kernels="triton").train()
    opt = build_optimizer(model, "muon", lr=3e-4, muon_lr=0.02)
    if not cuda:  # the fused passes on CPU run under the interpreter only when asked
        opt.fused_passes = True
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    scale = torch.tensor(0.5, device=dev)
    muon = [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    adam = [p for g in opt.param_groups if not g["use_muon"] for p in g["params"]]
    settings = {"old": (0, 0), "multi": (1, 0), "multi+adamw": (1, 1)}  # (MULTI, ADAMW_TRITON)
    res: dict = {"settings": "momentum/apply one launch per matrix (MULTI 0) or per shape group (1); AdamW by "
                 "torch._fused_adamw_ (ADAMW_TRITON 0) or our one-launch kernel (1)"}  # fmt: skip
    old = OK.MULTI, OK.ADAMW_TRITON
    opt.step(grad_scale=scale)  # creates the state
    # the same weights from the same state by every setting (Muon's exactly, AdamW's to rounding)
    # (torch's fused AdamW writes the scaled gradients back: those are restored too)
    snap = [(p, p.detach().clone(), {"grad": p.grad.clone(), **{k: v.clone() for k, v in opt.state[p].items()
             if torch.is_tensor(v)}}) for p in muon + adam]  # fmt: skip
    steps0 = {id(p): opt.state[p].get("step") for p in adam}
    after = {}
    for name, (multi, tri) in settings.items():
        OK.MULTI, OK.ADAMW_TRITON = bool(multi), bool(tri)
        for p, w, st in snap:
            p.data.copy_(w)
            for k, v in st.items():
                (p.grad if k == "grad" else opt.state[p][k]).copy_(v)
            if id(p) in steps0:
                opt.state[p]["step"] = steps0[id(p)]
        opt.step(grad_scale=scale)
        after[name] = [p.detach().clone() for p in muon[:8] + adam[:1]]
    res["same_muon_weights"] = all(torch.equal(x, y) for x, y in zip(after["old"][:-1], after["multi"][:-1]))
    e = after["multi+adamw"][-1] - after["multi"][-1]
    res["adamw_embed_max_rel_diff"] = (e.abs().max() / after["multi"][-1].abs().max()).item()
    del snap, after
    gpu: dict[str, list[float]] = {k: [] for k in settings}
    host: dict[str, list[float]] = {k: [] for k in settings}
    names = list(settings)
    for rep in range(steps):
        for name in names if rep % 2 == 0 else names[::-1]:
            OK.MULTI, OK.ADAMW_TRITON = (bool(x) for x in settings[name])
            if cuda:
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            t = time.perf_counter()
            opt.step(grad_scale=scale)
            host[name].append(1e3 * (time.perf_counter() - t))
            if cuda:
                b.record()
                torch.cuda.synchronize()
                gpu[name].append(a.elapsed_time(b))
    OK.MULTI, OK.ADAMW_TRITON = old
    for name in names:
        res[name] = {
            "gpu_ms_median": round(statistics.median(gpu[name]), 3) if cuda else None,
            "host_ms_median": round(statistics.median(host[name]), 3),
            "gpu_ms": [round(x, 2) for x in gpu[name]],
        }
        log(f"optim {name}: {res[name]}")
    log(
        f"optim same Muon weights: {res['same_muon_weights']}; AdamW rel diff {res['adamw_embed_max_rel_diff']:.2e}"
    )
    return res


# add_rms_norm's backward launch: (BWD_CONFIG (BLOCK_M, warps) or None, BWD_PER_SM or None, prefetch)
RMS = [(None, None, True), (None, 2, True), (None, 4, True), (None, 8, True), ((4, 8), None, True),
       ((1, 4), 2, True), (None, None, False)]  # fmt: skip


def rms_part(rows: int, n: int, cuda: bool, quick: bool = False) -> tuple[dict, str]:
    """add_rms_norm's backward as training runs it (bf16 dy, fp32 residual sum and its gradient in, fp32 dx
    and the bf16 branch's dx out, dW) per launch config: ms per call (CUDA graph) and GB/s."""
    import llmray.kernels.rmsnorm as RN  # noqa: N812

    dev = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    s_ = torch.randn(rows, n, device=dev)
    w = 1 + 0.1 * torch.randn(n, device=dev)
    _, _, rstd = RN.rms_norm_fwd(s_, w, 1e-6)
    dy = torch.randn(rows, n, device=dev, dtype=torch.bfloat16)
    ds = torch.randn(rows, n, device=dev)
    dx2 = torch.empty(rows, n, device=dev, dtype=torch.bfloat16)
    moved = rows * n * (2 + 4 + 4 + 4 + 2)
    want = RN.rms_norm_bwd(dy, s_, w, rstd, ds=ds, dx2=dx2)
    res: dict = {}
    best, best_ms, flags = "", float("inf"), ""
    old = RN.BWD_CONFIG, RN.BWD_PER_SM
    for cfg, per_sm, pre in [RMS[i] for i in (0, 1, 2)] if quick else RMS:
        name = f"cfg{cfg} per_sm{per_sm}{'' if pre else ' noprefetch'}"
        RN.BWD_CONFIG, RN.BWD_PER_SM = cfg, per_sm
        try:
            got = RN.rms_norm_bwd(dy, s_, w, rstd, ds=ds, dx2=dx2, prefetch=pre)
            ok = torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-3)
            ms = graph_ms(lambda p=pre: RN.rms_norm_bwd(dy, s_, w, rstd, ds=ds, dx2=dx2, prefetch=p),
                           20 if cuda else 1, cuda)  # fmt: skip
            res[name] = {"ms": round(ms, 4), "gb_s": round(moved / ms / 1e6), "ok": ok}
            if ok and pre and ms < best_ms:
                best, best_ms = name, ms
                kv = (("BWD_CONFIG", "/".join(map(str, cfg)) if cfg else None), ("BWD_PER_SM", per_sm))
                flags = "+".join(f"llmray.kernels.rmsnorm.{k}={v}" for k, v in kv)
        except Exception as e:
            res[name] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"rms {name}: {res[name]}")
    RN.BWD_CONFIG, RN.BWD_PER_SM = old
    res["best"], res["best_flags"] = best, flags
    return res, flags


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/train_micro")
    p.add_argument("--old", default="", help="a copy of the committed qk_norm_rope_train.py (the baseline)")
    p.add_argument("--parts", default="qk,optim,rms")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per setting")
    p.add_argument("--quick", action="store_true", help="fewer launch configs (a short GPU window)")
    p.add_argument("--qk-designs", default="rows,token,groups,tma", help="qk: which designs' configs to time")
    p.add_argument("--smoke", action="store_true", help="CPU: small shapes under the Triton interpreter")
    a = p.parse_args()
    cuda = torch.cuda.is_available() and not a.smoke
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    shape, preset = ((8, 2048, 16, 8, 128), "qwen3-0.6b") if cuda else ((1, 6, 4, 2, 16), "tiny")
    for part in filter(None, a.parts.split(",")):
        try:
            if part == "qk":
                res["qk"], flags = qk_part(shape, cuda, a.old or None, a.quick, a.qk_designs)
                (out / "best_flags.txt").write_text(flags + "\n")
            elif part == "rms":
                res["rms"], flags = rms_part(*((16384, 1024) if cuda else (12, 64)), cuda, a.quick)
                (out / "rms_flags.txt").write_text(flags + "\n")
            elif part == "optim":
                res["optim"] = optim_part(preset, cuda, 2 if a.smoke else a.steps)
        except Exception as e:  # keep going: the next part may still run
            import traceback

            traceback.print_exc()
            res[part] = f"{type(e).__name__}: {str(e)[:400]}"
        (out / "micro.json").write_text(json.dumps(res, indent=1))
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
