"""The tall LoRA layout (one GEMM over [W ; A of every slot] + one expand) against the split path (GEMM +
shrink + expand) for one forward of Qwen3-0.6B's LoRA'd projections (28 layers x {fused q|k|v, o, fused
gate|up, down}), 16 adapters rank 16, rows sorted by slot, each variant in one CUDA graph: ms per forward
(all four projections, then each alone at the first row count), and the tall output against the split one.

    python bench/lora_tall.py --out DIR [--rows 256,1024,8192]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lora_profile import PROJS, SLOTS, _graph_ms, random_layers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--rows", default="256,8192")
    ap.add_argument(
        "--sweep",
        default="",
        help="then, at the first row count, each projection's tall expand alone per config BMxBOxWARPS "
        "(comma-separated; gate_up also with the SwiGLU fusion)",
    )
    ap.add_argument("--modes", default="base,split,tall,tall_gemm")
    args = ap.parse_args()
    from llmray.kernels.lora import lora_expand, lora_shrink
    from llmray.kernels.lora_tall import lora_tall_expand, lora_tall_expand_swiglu

    cuda = torch.cuda.is_available()  # (CPU: a logic check under TRITON_INTERPRET=1, fp32)
    dev, dt = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    out_path = Path(args.out) / "lora_tall.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    results: dict = {"device": device, "command": " ".join(sys.argv), "rows": {}}

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=2))

    g = torch.Generator(device=dev).manual_seed(0)
    layers = random_layers(dev, dt, g)
    for (
        layer
    ) in layers:  # W_cat = [W ; A] with A (S, G·R, K) slot-major, as ShrinkGroup(tall=True) lays it out
        for name, _, _ in PROJS:
            w, a, b, seg = layer[name]
            w_cat = torch.cat([w, a.reshape(-1, a.shape[-1])])
            layer[name] = (w_cat[: w.shape[0]], w_cat[w.shape[0] :].view_as(a), b, seg, w_cat)
    scales = torch.ones(SLOTS, device=dev)
    for i, n in enumerate(int(r) for r in args.rows.split(",")):
        slots = (torch.arange(n, device=dev) * SLOTS // n).to(torch.int32)
        xs = {k: torch.randn(n, k, device=dev, dtype=dt, generator=g) for k in {p[1] for p in PROJS}}
        res = {name: torch.empty(n, sum(outs), device=dev, dtype=dt) for name, _, outs in PROJS}

        def step(mode: str, only=None, cfg=(0, 128, 4), n=n, slots=slots, xs=xs, res=res) -> dict:
            outs = {}
            bm, bo, warps = cfg
            for layer in layers:
                for name, k, _ in PROJS:
                    if only is not None and name != only:
                        continue
                    w, a, b, seg, w_cat = layer[name]
                    x = xs[k]
                    if mode == "tall":
                        full = torch.mm(x, w_cat.t())
                        outs[name] = lora_tall_expand(
                            full, b, slots, scales, len(seg) + 1, seg, bo, warps, bm
                        )
                        continue
                    if mode == "tall_swiglu":  # gate|up: the expand and the gated SwiGLU in one launch
                        full = torch.mm(x, w_cat.t())
                        outs[name] = lora_tall_expand_swiglu(full, b, slots, scales, bo, warps, bm)
                        continue
                    if mode == "tall_gemm":
                        outs[name] = torch.mm(x, w_cat.t())
                        continue
                    torch.mm(x, w.t(), out=res[name])
                    if mode == "split":
                        lora_expand(lora_shrink(x, a, slots, scales), b, slots, res[name], seg=seg)
                    outs[name] = res[name]
            return outs

        row: dict = {}
        results["rows"][f"{n}_rows"] = row
        try:  # the last layer's outputs: tall (bf16 y) against split (fp32 y)
            tall, split = step("tall"), {k: v.clone() for k, v in step("split").items()}
            row["tall_vs_split_max_rel_err"] = max(
                ((tall[p] - split[p]).abs().max() / split[p].abs().max()).item() for p in tall
            )
        except Exception as e:
            row["tall_vs_split_max_rel_err"] = f"failed: {e!r}"[:300]
        print(f"rows={n} tall vs split: {row['tall_vs_split_max_rel_err']}", flush=True)
        for mode in args.modes.split(","):
            t = time.perf_counter()
            try:
                per = {"all": _graph_ms(lambda mode=mode: step(mode), reps=20 if n <= 1024 else 4)}
                if i == 0:
                    for name, _, _ in PROJS:
                        per[name] = _graph_ms(lambda mode=mode, name=name: step(mode, name), reps=20)
                row[mode] = per
            except Exception as e:  # one failing variant must not cost the others
                row[mode] = f"failed: {e!r}"[:300]
            print(f"rows={n} {mode}: {row[mode]} ms ({time.perf_counter() - t:.1f} s)", flush=True)
            save()
        if i == 0 and args.sweep:  # tile configs of the tall expand, each projection alone
            sweep: dict = {}
            row["sweep"] = sweep
            for spec in args.sweep.split(","):
                cfg = tuple(int(v) for v in spec.split("x"))
                per: dict = {}
                for name, _, _ in PROJS:
                    try:
                        per[name] = _graph_ms(lambda cfg=cfg, name=name: step("tall", name, cfg), reps=20)
                        if name == "gate_up":
                            per["gate_up_swiglu"] = _graph_ms(
                                lambda cfg=cfg: step("tall_swiglu", "gate_up", (cfg[0], cfg[1] // 2, cfg[2])),
                                reps=20,
                            )
                    except Exception as e:  # a config that does not fit (member boundaries) or fails
                        per[name] = f"failed: {e!r}"[:200]
                sweep[spec] = per
                print(f"rows={n} sweep {spec}: {per}", flush=True)
                save()


if __name__ == "__main__":
    main()
