"""Paged decode kernel alone: launch configurations side by side with the committed one, same run.

    python bench/decode_sweep.py --out DIR [--budget-s 45]     # one H200
    TRITON_INTERPRET=1 python bench/decode_sweep.py --quick --out /tmp/d   # CPU: tiny shapes, logic check

Cases (Qwen3-0.6B heads: 16 query / 8 KV, head dim 128, 16-token pages, pages shuffled):
- batch 256 at the nano-vllm workload's contexts (prompt U[100, 1024] + a uniform share of an output
  U[100, 1024]: mean ~840, so the programs are uneven as in the engine), bf16 cache and fp8 cache;
- batch 1 at context 800 (single-stream decode: split-K over the context).
Each config = (BLOCK_N, num_warps, num_stages) x a split multiplier. The committed config runs first and again
last (its spread is the noise). Every config's output is checked against the committed one's (and that one
against the torch reference on the first sequences). Writes decode_sweep.json with the times (median ms,
``triton.testing.do_bench``), the achieved bandwidth (KV bytes / time) and ``best`` per case.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmray.kernels import paged_attention as pa  # noqa: E402

H, HKV, D, PAGE = 16, 8, 128, 16
CONFIGS = {  # candidates, most promising first: (BLOCK_N, warps, stages, split multiplier, heads fast,
    # v scale first, kv heads, trans g); 5 stages double-buffer K/V behind the page-table stage (3-4 stages: one
    # K/V buffer), 7 stages: three buffers; heads fast: grid (Hkv, B) so that a sequence's KV heads run together;
    # v scale first (fp8): V converted in registers, 16-bit transposing ldmatrix (no byte-wise shared loads);
    # kv heads 2: a program reads two adjacent heads' rows of a token as one row (fp8: 256 B, as bf16's one);
    # trans g > 0: S^T = K q^T, O^T = V^T P^T with the group padded to g columns instead of 16 rows; v asm (fp8):
    # V converted by inline PTX, scaled on the output (sm_90 SASS, fp8 (64, 2, 5): ~19 instructions per token
    # and warp vs ~31 committed: the kernel looks bound by instruction latency x warps per SM, not by bytes).
    # Rounds 1-3: bench/results/decode_sweep.json, decode_sweep_b.json, decode_sweep_c.json (v scale first:
    # fp8 0.188 ms vs 0.205; kv heads 2, more stages or warps: slower; bf16 2 warps 0.2215 vs 4 warps 0.2279)
    # Round 4 (bench/results/decode_sweep_d.json): fp8 trans 8 + v asm (64, 2, 5) 0.157 ms vs 0.186 committed;
    # 1 K/V buffer (3 stages) or 4 warps: slower; bf16 transposed: slower; batch 1 fp8 transposed: slower.
    # The loop issues tile i+B-1's K/V copies after tile i's math (B buffers = (stages - 1) // 2 here): 2
    # buffers hide one tile of latency; in flight per SM ~ programs x (B - 1) x tile bytes (bf16 (64, 2, 5):
    # 3 x 1 x 32 KB -> 3.95 TB/s; fp8 (64, 2, 5): 4 x 1 x 16 KB; (32, 1, 9): 5 x 3 x 8 KB).
    # fast addr: page/slot from the tile row, 32-bit offsets when the cache allows (SASS fp8 617 -> 541, bf16
    # 776 -> 539 instructions per tile and warp).
    # Round 5 (decode_sweep_e.json): fast addr fp8 0.1525 vs 0.1569, bf16 0.2213 vs 0.2225; (32, 1, 9) fa 0.1493;
    # more stages (7-11), 4 warps, kv heads 2, other splits: slower. Gather ceiling: attn_gather.json.
    # Round 6 (final, engine-sized caches): the committed configs vs the session's earlier ones.
    "fp8": [(64, 2, 5, 1, 1, 1, 1, 8, 1), (64, 2, 5, 1, 1, 1), (32, 1, 9, 1, 1, 1, 1, 8, 1, 1)],
    "bf16": [(64, 2, 5, 1, 1), (64, 2, 7, 1, 1, 0, 1, 0, 0, 1)],
    "b128_fp8": [(64, 2, 5, 1, 1, 1), (32, 1, 9, 1, 1, 1, 1, 8, 1, 1)],
    "b32_fp8": [(64, 2, 5, 1, 1, 1)],
    "bs1": [(64, 4, 5, 1, 1, 0, 1, 0, 0, 1)],
    "bs1_fp8": [(32, 4, 5, 1, 1, 1)],
}  # fmt: skip


def _lens(bsz: int, ctx: int | None, hi: int = 1024, seed: int = 0) -> list[int]:
    if ctx is not None:
        return [ctx] * bsz
    rng = random.Random(seed)
    return [rng.randint(hi // 10, hi) + int(rng.random() * rng.randint(hi // 10, hi)) for _ in range(bsz)]


def make_case(
    bsz: int, ctx: int | None, kv_dtype: torch.dtype, dev: str, hi: int = 1024, pool: int = 0
) -> dict:
    """``pool``: KV blocks in the cache (>= the blocks the batch uses; its pages are spread over all of them),
    e.g. the engine's: then the launcher picks 64-bit offsets exactly where the engine's cache needs them."""
    lens = _lens(bsz, ctx, hi)
    nblk = -(-max(lens) // PAGE)
    total = sum(-(-n // PAGE) for n in lens)
    g = torch.Generator(device="cpu").manual_seed(1)
    pool = max(pool, total)
    perm = torch.randperm(pool, generator=g)[:total]
    tables = torch.zeros(bsz, nblk, dtype=torch.int32)
    i = 0
    for b, n in enumerate(lens):
        k = -(-n // PAGE)
        tables[b, :k] = perm[i : i + k].to(torch.int32)
        i += k
    gd = torch.Generator(device=dev).manual_seed(1)  # K/V drawn on the device (seconds on the CPU)
    kc = (torch.randn(pool, PAGE, HKV, D, generator=gd, device=dev, dtype=torch.bfloat16) * 0.5).to(kv_dtype)
    vc = (torch.randn(pool, PAGE, HKV, D, generator=gd, device=dev, dtype=torch.bfloat16) * 0.5).to(kv_dtype)
    q = torch.randn(bsz, H, D, generator=g).to(torch.bfloat16 if dev == "cuda" else torch.float32)
    one = torch.full((1,), 0.37)  # the fp8 scales (K and V), not 1: a kernel that drops one shows
    t = dict(q=q, kc=kc, vc=vc, tables=tables, lens=torch.tensor(lens, dtype=torch.int32), one=one)
    t = {k: v.to(dev) for k, v in t.items()}
    t["kv_bytes"] = sum(lens) * HKV * D * 2 * kc.element_size()
    return t


def run(c: dict, conf: tuple | None, splits: int) -> torch.Tensor:
    return pa.paged_decode(
        c["q"], c["kc"], c["vc"], c["tables"], c["lens"], D**-0.5, num_splits=splits,
        k_scale=c["one"], v_scale=c["one"], config=conf,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny batch on CPU (TRITON_INTERPRET=1): logic only")
    ap.add_argument("--budget-s", type=float, default=60.0, help="stop starting new configs after this")
    ap.add_argument(
        "--engine-pools", action="store_true",
        help="caches as large as the nano-vllm engine's on an H200 (fp8 141,525 blocks, bf16 70,826: fp8 needs "
        "64-bit offsets there)",
    )  # fmt: skip
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 132
    t0 = time.perf_counter()
    if cuda:
        import triton

        def bench(f) -> float:
            return triton.testing.do_bench(f, warmup=10, rep=40, return_mode="median")

    bsz_big = 4 if args.quick else 256
    cases = [
        ("fp8", bsz_big, None, torch.float8_e4m3fn),
        ("bf16", bsz_big, None, torch.bfloat16),
        ("b128_fp8", 4 if args.quick else 128, None, torch.float8_e4m3fn),
        ("b32_fp8", 4 if args.quick else 32, None, torch.float8_e4m3fn),
        ("bs1", 1, 40 if args.quick else 800, torch.bfloat16),
        ("bs1_fp8", 1, 40 if args.quick else 800, torch.float8_e4m3fn),
    ]
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "cases": {}, "best": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if cuda:  # the bandwidth ceiling: a 2 GiB device-to-device copy (bytes read + written)
        src = torch.randn(2**29, device=dev)
        dst = torch.empty_like(src)
        ms = bench(lambda: dst.copy_(src))
        res["copy_tb_s"] = 2 * src.numel() * 4 / ms / 1e9
        print(f"copy ceiling {res['copy_tb_s']:.2f} TB/s", flush=True)
        del src, dst
    for name, bsz, ctx, kv_dtype in cases:
        pool = (141_525 if kv_dtype != torch.bfloat16 else 70_826) if args.engine_pools else 0
        c = make_case(bsz, ctx, kv_dtype, dev, 40 if args.quick else 1024, pool)
        if pool:
            print(f"{name}: {pool} KV blocks in the cache", flush=True)
        base_splits = pa.default_num_splits(bsz, HKV, sms, fp8=kv_dtype != torch.bfloat16)
        committed = pa.decode_config(torch.bfloat16, kv_dtype != torch.bfloat16, bsz)
        ref = run(c, None, base_splits).float()
        n = min(bsz, 4)  # the committed kernel against the torch reference on the first sequences
        qs = torch.arange(n + 1, dtype=torch.int32, device=dev)
        one = c["one"]
        tref = pa.paged_attention_ref(c["q"][:n], c["kc"], c["vc"], c["tables"][:n], qs, c["lens"][:n],
                                      D**-0.5, one, one).float()  # fmt: skip
        row: dict = {"committed": list(committed), "splits": base_splits, "kv_bytes": c["kv_bytes"],
                     "kv_blocks": c["kc"].shape[0],
                     "ref_rel_err": ((ref[:n] - tref).norm() / tref.norm()).item(), "configs": {}}  # fmt: skip
        hf0 = int(len(committed) > 4 and committed[4])
        vsf0 = int(len(committed) > 5 and committed[5])
        kvh0 = int(committed[6]) if len(committed) > 6 else 1
        tg0 = int(committed[7]) if len(committed) > 7 else 0
        va0 = int(len(committed) > 8 and committed[8])
        fa0 = int(len(committed) > 9 and committed[9])
        first = (*committed[:3], 1, hf0, vsf0, kvh0, tg0, va0, fa0)
        confs = [first] + CONFIGS[name] + [first]
        for i, cf in enumerate(confs):
            bn, w, s, mult, hf, vsf, kvh, tg, va, fa = (*cf, *(1, 0, 0, 1, 0, 0, 0)[len(cf) - 3 :])
            ns = max(1, int(base_splits * mult))  # (a multiplier 0.5: half the default splits)
            if args.quick:
                bn = min(bn, 16)
            conf = (bn, w, s, False, bool(hf), bool(vsf), kvh, tg, bool(va), bool(fa))
            key = f"{(bn, w, s)} splits{ns}" + (" heads_fast" if hf else "")
            key += (" v_scale_first" if vsf else "") + (f" kv_heads{kvh}" if kvh > 1 else "")
            key += (f" trans{tg}" if tg else "") + (" v_asm" if va else "") + (" fast_addr" if fa else "")
            key += " committed" if i in (0, len(confs) - 1) else ""
            key += " again" if i == len(confs) - 1 else ""
            if time.perf_counter() - t0 > args.budget_s and 0 < i < len(confs) - 1:
                row["configs"][key] = "skipped (budget)"
                continue
            try:
                o = run(c, conf, ns).float()
                err = ((o - ref).norm() / ref.norm()).item()
                ms = bench(lambda c=c, cf=conf, ns=ns: run(c, cf, ns)) if cuda else 0.0
                row["configs"][key] = {
                    "config": list(conf),
                    "split_mult": mult,
                    "ms": ms,
                    "rel_err": err,
                    "tb_s": c["kv_bytes"] / ms / 1e9 if ms else 0,
                }
                if err > 1e-2 or not torch.isfinite(o).all():
                    row["configs"][key]["wrong"] = True
            except Exception as e:  # a config that does not compile or launch: note it, go on
                row["configs"][key] = f"error {type(e).__name__}: {str(e)[:300]}"
            print(f"[{time.perf_counter() - t0:5.1f}s] {name} {key}: {row['configs'][key]}", flush=True)
        ok = {k: v for k, v in row["configs"].items() if isinstance(v, dict) and not v.get("wrong")}
        if ok:
            k = min(ok, key=lambda k: ok[k]["ms"])
            res["best"][name] = {
                "config": ok[k]["config"],
                "split_mult": ok[k]["split_mult"],
                "ms": ok[k]["ms"],
            }
            res["best"][name]["key"] = k
        res["cases"][name] = row
        (out / "decode_sweep.json").write_text(json.dumps(res, indent=2))
        c = {}
    print(json.dumps(res["best"], indent=2))


if __name__ == "__main__":
    main()
