"""How much of a training step's work could hide behind other work: pairs of its kernels on two streams.

For each pair (A, B) of pieces of a qwen3-0.6b 8 x 2,048 bf16 step, on one GPU: A alone, B alone, A then
B on one stream, and A and B launched together on two streams (each timed by CUDA events over ``--reps``
repetitions, the median). ``hidden`` = (serial - concurrent) / min(A, B): 1.0 means the smaller piece was
free, 0 that nothing overlapped. Pieces: ``wgrad`` (a weight-gradient GEMM into fp32), ``gemm`` (the
gate|up forward GEMM), ``ns`` (Newton-Schulz on the 28 (1,024 x 3,072) down-projection stack), ``attn``
(causal GQA SDPA forward + backward, one layer), ``rms_bwd`` (add_rms_norm's backward, fp32 residual),
``ce_rows`` (one chunk's cross-entropy rows, 4,096 x 151,936), ``copy`` (a 512 MB device copy).

    python bench/train_overlap.py --out DIR [--pairs wgrad+rms_bwd,ns+attn] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS = "wgrad+rms_bwd,wgrad+ce_rows,wgrad+attn,gemm+ce_rows,ns+attn,ns+rms_bwd,ns+copy,wgrad+copy"


def pieces(dev: torch.device) -> dict:
    from llmray.kernels.cross_entropy import cross_entropy_rows
    from llmray.kernels.newton_schulz import newton_schulz_sym
    from llmray.kernels.rmsnorm import rms_norm_bwd, rms_norm_fwd

    bf, f32 = torch.bfloat16, torch.float32
    m, h, f = 16384, 1024, 3072
    x = torch.randn(m, h, device=dev, dtype=bf)
    dy = torch.randn(m, 2 * f, device=dev, dtype=bf)
    w = torch.randn(2 * f, h, device=dev, dtype=bf) * 0.02
    stack = torch.randn(28, h, f, device=dev, dtype=bf)
    q = torch.randn(8, 16, 2048, 128, device=dev, dtype=bf, requires_grad=True)
    kv = [torch.randn(8, 8, 2048, 128, device=dev, dtype=bf, requires_grad=True) for _ in range(2)]
    go = torch.randn(8, 16, 2048, 128, device=dev, dtype=bf)
    res = torch.randn(m, h, device=dev, dtype=f32)
    nw = torch.ones(h, device=dev, dtype=f32)
    _, s, rstd = rms_norm_fwd(x, nw, 1e-6, residual=res, out_dtype=bf)
    dres = torch.randn(m, h, device=dev, dtype=f32)
    dx2 = torch.empty(m, h, device=dev, dtype=bf)
    logits = torch.randn(4096, 151936, device=dev, dtype=bf)
    tgt = torch.randint(0, 151936, (4096,), device=dev)
    n_valid = torch.tensor(16384, device=dev)
    big = torch.empty(256 << 20, device=dev, dtype=bf)
    big2 = torch.empty_like(big)

    def attn():
        o = F.scaled_dot_product_attention(q, kv[0], kv[1], is_causal=True, enable_gqa=True)
        torch.autograd.grad(o, [q, *kv], go)

    return {
        "wgrad": lambda: torch.mm(dy.t(), x, out_dtype=f32),
        "gemm": lambda: x @ w.t(),
        "ns": lambda: newton_schulz_sym(stack, 5, (3.4445, -4.7750, 2.0315)),
        "attn": attn,
        "rms_bwd": lambda: rms_norm_bwd(x, s, nw, rstd, ds=dres, dx2=dx2),
        "ce_rows": lambda: cross_entropy_rows(logits, tgt, n_valid),
        "copy": lambda: big2.copy_(big),
    }


def timed(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        ts.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ts)


def concurrent(fa, fb, side: torch.cuda.Stream):
    main = torch.cuda.current_stream()

    def run():
        side.wait_stream(main)
        fa()
        with torch.cuda.stream(side):
            fb()
        main.wait_stream(side)

    return run


def ce_variants(reps: int) -> dict:
    """The cross-entropy rows kernel (one 4,096 x 151,936 bf16 chunk) per launch variant, vs the default:
    ms, and whether loss and gradient match it exactly."""
    import llmray.kernels.cross_entropy as ce

    dev = torch.device("cuda")
    logits = torch.randn(4096, 151936, device=dev, dtype=torch.bfloat16) * 4
    tgt = torch.randint(0, 151936, (4096,), device=dev)
    n_valid = torch.tensor(4096, device=dev)
    work = logits.clone()
    res: dict = {}
    ref = None
    variants = [{"ROWS_REVERSE": False}, {"ROWS_REVERSE": True}]
    defaults = {k: getattr(ce, k) for v in variants for k in v}
    for var in variants:
        for k, val in {**defaults, **var}.items():
            setattr(ce, k, val)
        name = " ".join(f"{k.removeprefix('ROWS_')}={val}" for k, val in var.items())
        try:
            work.copy_(logits)
            loss = ce.cross_entropy_rows(work, tgt, n_valid)
            if ref is None:
                ref = (loss.clone(), work.clone())
            same = bool(torch.equal(loss, ref[0]) and torch.equal(work, ref[1]))
            diff = [float((loss - ref[0]).abs().max()), float((work.float() - ref[1].float()).abs().max())]
            ms = timed(lambda: (work.copy_(logits), ce.cross_entropy_rows(work, tgt, n_valid)), reps)
            copy_ms = timed(lambda: work.copy_(logits), reps)
            res[name] = {"ms": round(ms - copy_ms, 4), "same": same, "max_diff_loss_grad": diff}
        except Exception as e:  # a launch config that does not compile: report it, go on
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("ce", name, res[name], flush=True)
    for k, val in defaults.items():
        setattr(ce, k, val)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", default=PAIRS)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--ce", action="store_true", help="also: the cross-entropy rows kernel's launch variants")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dev = torch.device("cuda")
    fns = pieces(dev)
    side = torch.cuda.Stream()
    for fn in fns.values():  # compile / warm up every piece
        fn()
    torch.cuda.synchronize()
    alone = {k: round(timed(fn, a.reps), 4) for k, fn in fns.items()}
    print("alone ms", alone, flush=True)
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "alone_ms": alone}
    pairs = {}
    for pair in a.pairs.split(","):
        ka, kb = pair.split("+")
        fa, fb = fns[ka], fns[kb]
        serial = timed(lambda fa=fa, fb=fb: (fa(), fb()), a.reps)
        conc = timed(concurrent(fa, fb, side), a.reps)
        hidden = (serial - conc) / min(alone[ka], alone[kb])
        pairs[pair] = {
            "serial_ms": round(serial, 4),
            "concurrent_ms": round(conc, 4),
            "hidden": round(hidden, 3),
        }
        print(pair, pairs[pair], flush=True)
    out["pairs"] = pairs
    if a.ce:
        out["ce_rows_variants"] = ce_variants(a.reps)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "train_overlap.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
