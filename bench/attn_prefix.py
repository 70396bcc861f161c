"""Prefix-hit prefill attention alone: the split-K launch configs side by side, same run.

    python bench/attn_prefix.py --out DIR [--budget-s 40] [--jobs 4]     # one H200
    TRITON_INTERPRET=1 python bench/attn_prefix.py --quick --out /tmp/p   # CPU: tiny shapes, logic check

The case of bench/engine.py's prefix figure: a 2,048-token prompt after one sharing 2,000 tokens, so 48 new
query tokens attend to 2,048 (Qwen3-0.6B heads: 16 query / 8 KV, head dim 128, 16-token pages scattered over
a pool), 28 layers each with its own cache. The step's work list is the prefill graph's (one tile, padding
tiles -1). Each variant (split count, ``SplitConfig``: "wide", the engine's one-sequence default, against
"narrow", its default for several sequences; rows 0 = per-head programs + a merge kernel, the launcher's
fallback) is captured as a CUDA graph of the 28 layers' attention calls and its
replays are timed with CUDA events (median); launch latency is most of the cost, so the graph is the unit.
Every variant's output (poisoned before, every element must be written) is checked against the torch
reference in fp32, eagerly and again after the timed replays (the tickets must be reset by every launch).
``--jobs N`` compiles the variants in N processes first (Triton's cache), so the budget goes to measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmray.kernels import paged_attention as pa  # noqa: E402
from llmray.kernels.paged_prefill import SPLIT_CONFIGS, SplitConfig  # noqa: E402

H, HKV, D, PAGE = 16, 8, 128, 16
# (cache kind, splits, config[, options]): the engine's defaults first and again last (their spread is the
# noise). History (H200, bench/results/attn_prefix*.json): per-head programs + a merge kernel 0.784 ms; the
# sixth session's one-launch GQA kernel 0.480 (removed in the eighth: no default used it); seventh session's
# _prefill_split_kernel: W1 0.416 (grid without the padding tiles, PDL, bf16 partials); W3 (attn_prefix.json)
# wide 0.379 / 0.378, narrow 0.423 / 0.419, wide 12 splits 0.402, wide merge rows 8 0.403; fp8 wide 0.426.
# Options: PT, each layer's q written just before by a Triton copy that triggers the PDL launch (the engine's
# rope kernel: a read of q before griddepcontrol.wait would see the previous layer's); T3, the engine's
# 3-tile list (its prefill graph for 48 tokens, bucket 64). Config "copies": the PT copies alone.
S = SplitConfig
PT = {"pred": "trig"}
T3 = {"tiles": 3}
W = SPLIT_CONFIGS["wide"]  # 128 rows, 16 splits of 2 x 64 keys, the merge in a second (PDL) kernel
N = SPLIT_CONFIGS["narrow"]  # 16 rows, bf16 partials, PDL, the last split merging: steps of several sequences
VARIANTS = [
    ("bf16", 8, W),
    ("bf16", 8, N),
    ("fp8", 8, W),
    ("fp8", 8, N),
    ("bf16", 8, W, T3),
    ("bf16", 8, W, PT),
    ("bf16", 8, "copies", PT),
    ("bf16", 8, S(rows=0)),
    ("bf16", 8, W),
    ("bf16", 8, N),
]  # fmt: skip
TIMELINES = [("bf16", 8, W)]  # fmt: skip


def build(kind: str, layers: int, ctx: int, qlen: int, pool: int, dev: str, seed: int = 0) -> dict:
    """Per layer: its own shuffled page pool holding the sequence's ctx tokens, and its own queries (bf16; fp32
    under the CPU interpreter, whose bf16 loads are not exact)."""
    dt = torch.float32 if dev == "cpu" else torch.bfloat16
    nb = -(-ctx // PAGE)
    table = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[:nb].to(torch.int32)[None]
    table = table.to(dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    caches, qs, scales = [], [], []
    for _ in range(layers):
        k = torch.randn(pool, PAGE, HKV, D, generator=g, device=dev)
        v = torch.randn(pool, PAGE, HKV, D, generator=g, device=dev)
        if kind == "fp8":
            ks, vs = torch.tensor([0.02], device=dev), torch.tensor([0.03], device=dev)
            k, v = (k * 0.02 / ks).to(torch.float8_e4m3fn), (v * 0.03 / vs).to(torch.float8_e4m3fn)
            scales.append((ks, vs))
        else:
            k, v = k.to(dt), v.to(dt)
            scales.append((None, None))
        caches.append((k, v))
        qs.append(torch.randn(qlen, H, D, generator=g, device=dev).to(dt))
    block_m = pa.prefill_block_m(dt)
    ntiles = 256 // block_m + 2  # the prefill graph's work list for 256 tokens over one sequence
    tile_seq = torch.full((ntiles,), -1, dtype=torch.int32)
    tile_m = torch.zeros(ntiles, dtype=torch.int32)
    nt = -(-qlen // block_m)
    tile_seq[:nt], tile_m[:nt] = 0, torch.arange(nt, dtype=torch.int32)
    return {
        "caches": caches,
        "scales": scales,
        "q": qs,
        "outs": [torch.empty_like(q) for q in qs],
        "qbuf": torch.empty_like(qs[0]),
        "table": table,
        "qs": torch.tensor([0, qlen], dtype=torch.int32, device=dev),
        "cl": torch.tensor([ctx], dtype=torch.int32, device=dev),
        "tiles": (tile_seq.to(dev), tile_m.to(dev)),
    }


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr, TRIGGER: tl.constexpr):
    if TRIGGER:  # the next kernel (PDL) may launch now: it waits for this grid's writes itself
        tl.extra.cuda.gdc_launch_dependents()
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + o, tl.load(src_ptr + o, mask=o < n), mask=o < n)


def run_layers(
    case: dict,
    splits: int,
    cfg: SplitConfig | str,
    layers: list[int],
    pred: bool | str = False,
    ntiles: int = 0,
) -> None:
    """The layers' attention calls; ``pred``: each after a copy of its q into one shared buffer (a kernel
    writing q just before, as the engine's rope: a PDL launch must wait for it); config "copies": the copies."""
    for i in layers:
        (k, v), (ks, vs) = case["caches"][i], case["scales"][i]
        q = case["q"][i]
        if pred == "trig":
            n = q.numel()
            _copy_kernel[(triton.cdiv(n, 2048),)](q, case["qbuf"], n, BLOCK=2048, TRIGGER=q.is_cuda)
            q = case["qbuf"]
        elif pred:
            q = case["qbuf"].copy_(q)
        if cfg == "copies":
            continue
        tiles = case["tiles"] if not ntiles else (case["tiles"][0][:ntiles], case["tiles"][1][:ntiles])
        pa.paged_prefill(
            q, k, v, case["table"], case["qs"], case["cl"], 0, D**-0.5,
            out=case["outs"][i], tiles=tiles, k_scale=ks, v_scale=vs, num_splits=splits, config=cfg,
        )  # fmt: skip


def reference(case: dict, i: int) -> torch.Tensor:
    (k, v), (ks, vs) = case["caches"][i], case["scales"][i]
    kf = k.float() * (ks if ks is not None else 1.0)
    vf = v.float() * (vs if vs is not None else 1.0)
    return pa.paged_attention_ref(
        case["q"][i].float(), kf, vf, case["table"], case["qs"], case["cl"], D**-0.5
    )


def errors(case: dict, refs: dict, layers: list[int]) -> dict:
    out = {"rel_err": 0.0, "max_err": 0.0, "unwritten": 0}
    for i in layers:
        o, r = case["outs"][i].float(), refs[i]
        out["unwritten"] += int(torch.isnan(o).sum())
        o = torch.nan_to_num(o, nan=0.0)
        out["rel_err"] = max(out["rel_err"], float((o - r).norm() / r.norm()))
        out["max_err"] = max(out["max_err"], float((o - r).abs().max()))
    return out


def time_graph(
    case: dict,
    splits: int,
    cfg: SplitConfig | str,
    layers: int,
    reps: int,
    pred: bool | str = False,
    ntiles: int = 0,
) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_layers(
            case, splits, cfg, list(range(layers)), pred, ntiles
        )  # (allocations, compiles: not captured)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_layers(case, splits, cfg, list(range(layers)), pred, ntiles)
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=40.0)
    p.add_argument("--quick", action="store_true", help="CPU interpreter: a few tiny layers, no timing")
    p.add_argument("--jobs", type=int, default=0, help="compile the variants in this many processes first")
    p.add_argument("--compile-only", default="", help="(worker) comma-separated variant indices")
    p.add_argument("--only", default="", help="comma-separated variant indices (default: all)")
    p.add_argument("--timeline-s", type=float, default=0.0, help="then per-program timelines for this long")
    a = p.parse_args()
    t0 = time.time()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    quick = a.quick or dev == "cpu"
    layers, ctx, qlen, pool = (2, 60, 13, 12) if quick else (28, 2048, 48, 1024)
    idx = [int(x) for x in (a.compile_only or a.only).split(",") if x] or list(range(len(VARIANTS)))
    if a.jobs > 1 and not a.compile_only and not quick:
        todo = idx + (list(range(len(VARIANTS), len(VARIANTS) + len(TIMELINES))) if a.timeline_s else [])
        chunks = [todo[j :: a.jobs] for j in range(a.jobs)]
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--out", a.out, "--compile-only", ",".join(map(str, c))]
            )
            for c in chunks
            if c
        ]
        for pr in procs:
            try:
                pr.wait(timeout=max(5.0, a.budget_s * 0.6 - (time.time() - t0)))
            except subprocess.TimeoutExpired:
                pr.kill()
        print(
            f"[{time.time() - t0:.1f}s] precompiled {len(idx)} variants in {len(procs)} processes", flush=True
        )
    cases: dict[str, dict] = {}
    refs: dict[str, dict] = {}
    res: dict = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)",
        "command": "python bench/attn_prefix.py " + " ".join(sys.argv[1:]),
        "case": {"layers": layers, "context": ctx, "new_tokens": qlen, "heads": [H, HKV, D], "page": PAGE},
        "results": [],
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for n, vi in enumerate(idx):
        kind, splits, cfg, *opt = VARIANTS[vi] if vi < len(VARIANTS) else TIMELINES[vi - len(VARIANTS)]
        pred = opt[0].get("pred", False) if opt else False
        ntiles = opt[0].get("tiles", 0) if opt else 0
        if a.compile_only:
            if kind not in cases:
                cases[kind] = build(kind, 1, ctx, qlen, pool, dev)
            if vi < len(VARIANTS):
                run_layers(cases[kind], splits, cfg, [0])
            else:
                from attn_timeline import timeline

                try:  # (compiles the TIMES kernel; one layer has no timeline to summarize)
                    timeline(cases[kind], splits, cfg, 1)
                except Exception:  # noqa: BLE001, S110
                    pass
            continue
        last = n == len(idx) - 1
        if time.time() - t0 > a.budget_s and not last:
            continue  # (the committed repeat at the end still runs)
        if kind not in cases:
            cases[kind] = build(kind, layers, ctx, qlen, pool, dev)
            refs[kind] = {i: reference(cases[kind], i) for i in (0, layers - 1)}
        case, check = cases[kind], [0, layers - 1]
        for i in check:
            case["outs"][i].fill_(float("nan"))
        run_layers(case, splits, cfg, check, pred, ntiles)
        row = {"kind": kind, "splits": splits, "config": cfg if isinstance(cfg, str) else cfg._asdict()}
        if pred:
            row["pred"] = pred
        if ntiles:
            row["tiles"] = ntiles
        if cfg != "copies":
            row.update(errors(case, refs[kind], check))
        if not quick:
            for i in check:
                case["outs"][i].fill_(float("nan"))
            ms = time_graph(case, splits, cfg, layers, reps=40, pred=pred, ntiles=ntiles)
            row.update(ms_layers=round(ms, 4), us_per_layer=round(ms * 1000 / layers, 2))
            if cfg != "copies":
                after = errors(case, refs[kind], check)
                row["rel_err_after_replays"] = after["rel_err"]
                row["unwritten"] += after["unwritten"]
        res["results"].append(row)
        print(f"[{time.time() - t0:.1f}s]", json.dumps(row), flush=True)
        timed = [
            r
            for r in res["results"]
            if r.get("rel_err_after_replays", 1) < 2e-2
            and not r.get("unwritten", 1)
            and not r.get("pred")
            and not r.get("tiles")
        ]
        for kind_ in ("bf16", "fp8"):
            rows = [r for r in timed if r["kind"] == kind_]
            if rows:
                res.setdefault("best", {})[kind_] = min(rows, key=lambda r: r["ms_layers"])
        Path(a.out, "attn_prefix.json").write_text(json.dumps(res, indent=1))
    if not a.compile_only:
        print(f"[{time.time() - t0:.1f}s] wrote {Path(a.out, 'attn_prefix.json')}", flush=True)
    t1 = time.time()
    for kind, splits, cfg in TIMELINES if a.timeline_s and not a.compile_only and not quick else []:
        if time.time() - t1 > a.timeline_s:
            break
        from attn_timeline import timeline

        if kind not in cases:
            cases[kind] = build(kind, layers, ctx, qlen, pool, dev)
        try:
            tl_ = timeline(cases[kind], splits, cfg, layers)
        except Exception as e:  # noqa: BLE001 (instrumentation only: report, keep the results)
            print(f"timeline failed: {e!r}", flush=True)
            break
        tl_.update(kind=kind, splits=splits, config=cfg._asdict())
        res.setdefault("timelines", []).append(tl_)
        print(f"[{time.time() - t0:.1f}s] timeline", json.dumps(tl_), flush=True)
        Path(a.out, "attn_prefix.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
