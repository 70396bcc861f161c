"""Gather ceiling of the paged KV cache: read K and V through the block tables as decode does, no math.

    python bench/attn_gather.py --out DIR        # one H200 (appends to DIR/attn_gather.json)

Each program reads its sequence's K and V rows of ``heads`` adjacent KV heads (row = heads x D x element size
bytes: fp8 one head = 128 B, two = 256 B, all eight = 1 KB; bf16 one head = 256 B) in tiles of BLOCK_N
tokens through the page table, and XOR-reduces them as int32 (no conversion, no dots). The TB/s it reaches
per row size is the ceiling a decode kernel reading rows of that size can approach (batch 256, contexts ~840
as in bench/decode_sweep.py; the 2 GiB device copy is the other ceiling).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_sweep import make_case  # noqa: E402


@triton.jit
def _gather_kernel(
    k_ptr,  # int32 views of the caches: (blocks, PAGE, HKV * ROW_H)
    v_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    stride_bt,
    stride_cb,
    stride_cs,
    ROW: tl.constexpr,  # int32 words per program row (heads x D x bytes / 4)
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    ctx = tl.load(lens_ptr + b)
    cols = tl.arange(0, ROW)
    acc = tl.zeros([ROW], tl.int32)
    for n0 in range(0, ctx, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < ctx
        page = tl.load(tables_ptr + b * stride_bt + offs // PAGE, mask=nmask, other=0).to(tl.int64)
        addr = page * stride_cb + (offs % PAGE) * stride_cs + h * ROW
        x = tl.load(k_ptr + addr[:, None] + cols[None, :], mask=nmask[:, None], other=0)
        y = tl.load(v_ptr + addr[:, None] + cols[None, :], mask=nmask[:, None], other=0)
        acc = acc ^ tl.xor_sum(x ^ y, 0)
    tl.store(out_ptr + (b * tl.num_programs(0) + h) * ROW + cols, acc)


def gather(c: dict, heads: int, block_n: int, warps: int, stages: int) -> torch.Tensor:
    kc, vc = c["kc"].view(torch.int32), c["vc"].view(torch.int32)  # (blocks, PAGE, HKV, D * bytes / 4)
    nb, page, hkv, row_h = kc.shape
    kc, vc = kc.reshape(nb, page, hkv * row_h), vc.reshape(nb, page, hkv * row_h)
    bsz = c["tables"].shape[0]
    out = torch.empty(bsz * hkv * row_h, dtype=torch.int32, device=kc.device)
    _gather_kernel[(hkv // heads, bsz)](
        kc, vc, c["tables"], c["lens"], out, c["tables"].stride(0), kc.stride(0), kc.stride(1),
        ROW=heads * row_h, BLOCK_N=block_n, PAGE=page, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


CONFIGS = {  # (heads per program, BLOCK_N, warps, stages)
    "fp8": [(1, 64, 2, 5), (2, 64, 2, 5), (8, 64, 4, 3), (1, 64, 4, 3), (2, 64, 4, 3), (1, 128, 4, 5),
            (2, 32, 2, 5), (1, 32, 1, 5)],
    "bf16": [(1, 64, 2, 5), (2, 64, 4, 3), (1, 64, 4, 3)],
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = "cuda"
    t0 = time.perf_counter()
    res: dict = {"device": torch.cuda.get_device_name(), "cases": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, kv_dtype in (("fp8", torch.float8_e4m3fn), ("bf16", torch.bfloat16)):
        c = make_case(256, None, kv_dtype, dev)
        row: dict = {"kv_bytes": c["kv_bytes"], "configs": {}}
        for heads, bn, w, s in CONFIGS[name]:
            key = f"heads{heads} ({bn}, {w}, {s}) row {heads * 128 * c['kc'].element_size()} B"
            o1 = gather(c, heads, bn, w, s)
            ok = bool(torch.equal(o1, gather(c, heads, bn, w, s)))
            ms = triton.testing.do_bench(
                lambda a=(c, heads, bn, w, s): gather(*a), warmup=10, rep=40, return_mode="median"
            )
            row["configs"][key] = {"ms": ms, "tb_s": c["kv_bytes"] / ms / 1e9, "deterministic": ok}
            print(f"[{time.perf_counter() - t0:5.1f}s] {name} {key}: {row['configs'][key]}", flush=True)
        res["cases"][name] = row
        (out / "attn_gather.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
