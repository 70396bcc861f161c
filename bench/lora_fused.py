"""The one-launch LoRA delta (``lora_fused.lora_delta``: shrink recomputed per output tile + expand) after the
cuBLAS GEMM against the split path (GEMM + shrink + expand), for one forward of Qwen3-0.6B's LoRA'd projections
(28 layers x {fused q|k|v, o, fused gate|up, down}), 16 adapters rank 16, rows sorted by slot, each variant in
one CUDA graph: ms per forward for all four projections, then each alone. Also the one-launch result against
the split path's (max abs difference / max abs value, bf16).

    python bench/lora_fused.py --out DIR [--rows 256,8192] [--configs default,16x128x128x2x4x3,256:32x256x64x2x4x3]

A config is BLOCK_M x BLOCK_N x BLOCK_K x T x num_warps x num_stages (applied to every projection); "default"
is ``lora_fused.fused_config``'s choice per projection; "ROWS:CONFIG" applies at that many rows only.
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
    ap.add_argument("--rows", default="256")
    ap.add_argument("--configs", default="default")
    ap.add_argument("--adapters", type=int, default=16, help="adapters among the rows (round-robin, sorted)")
    args = ap.parse_args()
    from llmray.kernels import lora as lora_kernels
    from llmray.kernels.lora import _block_m, _num_splits, lora_expand, lora_shrink
    from llmray.kernels.lora_fused import lora_delta

    dev, dt = torch.device("cuda"), torch.bfloat16
    out_path = Path(args.out) / "lora_fused.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "rows": {}}

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=2))

    g = torch.Generator(device=dev).manual_seed(0)
    layers = random_layers(dev, dt, g)
    scales = torch.ones(SLOTS, device=dev)
    for n in (int(r) for r in args.rows.split(",")):
        slots = (torch.arange(n, device=dev) * args.adapters // n).to(torch.int32)
        xs = {k: torch.randn(n, k, device=dev, dtype=dt, generator=g) for k in {p[1] for p in PROJS}}
        res = {name: torch.empty(n, sum(outs), device=dev, dtype=dt) for name, _, outs in PROJS}

        def step(mode: str, config=None, only=None, n=n, slots=slots, xs=xs, res=res) -> None:
            for layer in layers:
                for name, k, _ in PROJS:
                    if only is not None and name != only:
                        continue
                    w, a, b, seg = layer[name]
                    x, y_out = xs[k], res[name]
                    torch.mm(x, w.t(), out=y_out)
                    if mode == "fused":
                        lora_delta(x, a, b, slots, scales, y_out, seg, config=config)
                    elif mode == "split":
                        block_o = 256 if n > 1024 else 128  # (as lora/layers.py launches it)
                        splits = None
                        if config:  # (an int: the default split count divided by it)
                            tiles = -(-n // _block_m(n))
                            splits = max(1, _num_splits(tiles, k, dev) // config)
                        y = lora_shrink(x, a, slots, scales, splits=splits)
                        lora_expand(y, b, slots, y_out, seg=seg, block_o=block_o)

        row: dict = {}
        results["rows"][f"{n}_rows"] = row
        try:  # the fused result against the split path's, every projection of layer 0
            errs = []
            for name, k, _ in PROJS:
                w, a, b, seg = layers[0][name]
                split = lora_expand(lora_shrink(xs[k], a, slots, scales), b, slots, xs[k] @ w.t(), seg=seg)
                fused = lora_delta(xs[k], a, b, slots, scales, xs[k] @ w.t(), seg)
                errs.append(
                    (fused.float() - split.float()).abs().max().item() / split.float().abs().max().item()
                )
            row["fused_vs_split_max_rel_diff"] = round(max(errs), 5)
        except Exception as e:
            row["fused_vs_split_max_rel_diff"] = f"failed: {e!r}"[:300]
        print(f"rows={n} fused vs split: {row['fused_vs_split_max_rel_diff']}", flush=True)
        variants: dict = {
            "base_gemms": ("base", None),
            "split": ("split", None),
            "split_no_pdl": ("split", None),
        }
        variants.update({f"split_splits_div{d}": ("split", d) for d in (2, 4)})  # fewer split-K programs
        for c in filter(None, args.configs.split(",")):
            if ":" in c:  # "ROWS:CONFIG": only at that many rows
                only, c = c.split(":")
                if int(only) != n:
                    continue
            cfg = None if c == "default" else tuple(int(v) for v in c.split("x"))
            variants[f"fused_{c}"] = ("fused", cfg)
        for key, (mode, cfg) in variants.items():
            lora_kernels.PDL = key != "split_no_pdl"  # (the shrink/expand launched with PDL, or plainly)
            t0 = time.perf_counter()
            row[key] = {}
            for only in (None, *(p[0] for p in PROJS)):  # the whole forward, then each projection alone
                try:
                    row[key][only or "all"] = _graph_ms(
                        lambda mode=mode, cfg=cfg, only=only: step(mode, cfg, only),
                        reps=20 if n <= 1024 else 4,
                    )
                except Exception as e:  # one failing variant must not cost the others
                    row[key][only or "all"] = f"failed: {e!r}"[:300]
            print(f"rows={n} {key}: {row[key]} ms ({time.perf_counter() - t0:.1f} s)", flush=True)
            save()
    save()


if __name__ == "__main__":
    main()
