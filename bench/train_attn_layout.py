"""Training attention (cuDNN SDPA, causal, GQA 16/8 heads x 128, 8 x 2,048) forward + backward by input layout (GPU).

Does the layout the model hands SDPA cost time in cuDNN's kernels or glue (dO.O row sums, dQ conversion, the
GQA head reduction)? Variants, each fwd + bwd of one layer (``torch.autograd.grad``), ms by
``triton.testing.do_bench`` (median, rounds alternating):

- ``model``: as the training step runs it: q, k (B, T, H, D) contiguous (the q/k norm+rope kernel's output),
  v a strided view of the fused (B, T, (16 + 8 + 8) x 128) projection, dO (B, T, H, D) contiguous;
- ``bhsd``: q, k, v, dO contiguous (B, H, T, D);
- ``v_contig``: as ``model`` with v contiguous (B, T, Hkv, D);
- ``mha``: k, v expanded to 16 heads beforehand (copies not timed): cuDNN's MHA path, no head reduction.

    python bench/train_attn_layout.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from triton.testing import do_bench

    dev, bf = torch.device("cuda"), torch.bfloat16
    b, t, hq, hk, d = 8, 2048, 16, 8, 128
    torch.manual_seed(0)
    qkv = torch.randn(b, t, (hq + 2 * hk) * d, device=dev, dtype=bf)
    q = torch.randn(b, t, hq, d, device=dev, dtype=bf)
    k = torch.randn(b, t, hk, d, device=dev, dtype=bf)
    v_view = qkv[..., (hq + hk) * d :].view(b, t, hk, d)
    do = torch.randn(b, t, hq, d, device=dev, dtype=bf)

    def run(qt, kt, vt, dot, gqa):
        qt, kt, vt = (x.detach().requires_grad_(True) for x in (qt, kt, vt))
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=d**-0.5, enable_gqa=gqa)
        return torch.autograd.grad(out, (qt, kt, vt), dot)

    tr = lambda x: x.transpose(1, 2)  # noqa: E731 - (B, T, H, D) <-> (B, H, T, D)
    variants = {
        "model": lambda: run(tr(q), tr(k), tr(v_view), tr(do), True),
        "bhsd": (
            lambda qc=tr(q).contiguous(), kc=tr(k).contiguous(), vc=tr(v_view).contiguous(), dc=tr(do).contiguous(): (
                run(qc, kc, vc, dc, True)
            )
        ),  # fmt: skip
        "v_contig": (lambda vc=v_view.contiguous(): run(tr(q), tr(k), tr(vc), tr(do), True)),
        "mha": (
            lambda ke=tr(k).repeat_interleave(2, 1), ve=tr(v_view).repeat_interleave(2, 1): run(
                tr(q), ke, ve, tr(do), False
            )
        ),  # fmt: skip
    }
    ref = [g.float() for g in variants["model"]()]
    res: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": [b, t, hq, hk, d],
    }
    checks = {}
    for n, fn in variants.items():
        gs = fn()
        if n == "mha":  # the expanded heads' gradients summed back to the kv heads
            gs = (gs[0], gs[1].unflatten(1, (hk, 2)).sum(2), gs[2].unflatten(1, (hk, 2)).sum(2))
        checks[n] = [float((g.float() - r).abs().max()) for g, r in zip(gs, ref, strict=True)]
    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(args.rounds):
        for n, fn in variants.items():
            times[n].append(do_bench(fn, warmup=5, rep=50))
    res["ms"] = {n: round(statistics.median(v), 4) for n, v in times.items()}
    res["all_ms"] = {n: [round(x, 4) for x in v] for n, v in times.items()}
    res["max_abs_grad_diff_vs_model"] = checks
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "attn_layout.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res["ms"]), json.dumps(checks))


if __name__ == "__main__":
    main()
