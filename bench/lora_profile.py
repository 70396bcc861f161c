"""Where a LoRA engine's time goes: the LoRA ops of one step in isolation, and kernel profiles of the engine.

1. ``micro``: the LoRA work of one forward of Qwen3-0.6B (28 layers x {fused q|k|v, o, fused gate|up, down})
   at decode (256 rows) and prefill (8192 rows) sizes, 16 adapters (rows sorted by slot, as the runner packs
   them), each variant captured in one CUDA graph and replayed: the base GEMMs alone, + our shrink/expand
   (default and tuned launch parameters), with the shrinks on a side stream overlapping the base GEMM, and a
   the "wide" path (one shrink writing [x | y] + one GEMM over [W | B of every slot]: the expand folded into
   the base GEMM) and that GEMM alone.
2. ``engine``: one LoRA engine with 16 adapters (bench/lora.py's workload): start-up (Triton compiles),
   a first timed run right after a short warm-up (traced), then base rows and a warm run; then torch.profiler
   over 20 decode steps and over the prefill steps of a batch, with and without adapters: device ms per
   kernel class (LoRA shrink/expand, GEMM, attention, ...) against the steps' wall time.

    python bench/lora_profile.py --out DIR [--parts engine,micro]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

# (name, K, member outputs) of the LoRA'd projections of one Qwen3-0.6B layer (fused groups stacked)
PROJS = [
    ("qkv", 1024, (2048, 1024, 1024)),
    ("o", 2048, (1024,)),
    ("gate_up", 1024, (3072, 3072)),
    ("down", 3072, (1024,)),
]
LAYERS, RANK, SLOTS = 28, 16, 16


def _graph_ms(fn, reps: int = 20) -> float:
    """Capture ``fn`` in a CUDA graph, replay it ``reps`` times: ms per replay (median of 3 batches)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return round(sorted(times)[1], 4)


def random_layers(dev: torch.device, dt: torch.dtype, g: torch.Generator) -> list[dict]:
    """LAYERS of {projection: (W (O, K), A (S, G*R, K), B (S, O, R), member boundaries)}, drawn from ``g``."""
    layers = []
    for _ in range(LAYERS):
        layer = {}
        for name, k, outs in PROJS:
            o, gsz = sum(outs), len(outs)
            w = torch.randn(o, k, device=dev, dtype=dt, generator=g) / k**0.5
            a = torch.randn(SLOTS, gsz * RANK, k, device=dev, dtype=dt, generator=g) / k**0.5
            b = torch.randn(SLOTS, o, RANK, device=dev, dtype=dt, generator=g) * 0.01
            seg = [0, *torch.tensor(outs).cumsum(0).tolist()]
            layer[name] = (w, a, b, tuple(seg[1:-1]))
        layers.append(layer)
    return layers


def micro(out: dict, save, rows_list=(256, 8192)) -> None:
    """Fills ``out`` ({"<rows>_rows": {variant: ms per forward}}), saving after each variant."""
    from llmray.kernels.lora import lora_expand, lora_shrink, lora_wide_shrink

    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    layers = random_layers(dev, dt, g)
    for layer in layers:
        for name, k, outs in PROJS:
            w, a, b, seg = layer[name]
            # wide: [W | B of every slot, block-diagonal over the members] (O, K + G*S*R)
            wide = torch.zeros(w.shape[0], k + len(outs) * SLOTS * RANK, device=dev, dtype=dt)
            wide[:, :k] = w
            layer[name] = (w, a, b, wide, seg)
    scales = torch.ones(SLOTS, device=dev)
    side = torch.cuda.Stream()
    for n in rows_list:
        slots = (torch.arange(n, device=dev) * SLOTS // n).to(torch.int32)
        xs = {k: torch.randn(n, k, device=dev, dtype=dt, generator=g) for k in (1024, 2048, 3072)}
        xw = {
            name: torch.randn(n, k + len(outs) * SLOTS * RANK, device=dev, dtype=dt, generator=g)
            for name, k, outs in PROJS
        }
        res = {name: torch.empty(n, sum(outs), device=dev, dtype=dt) for name, _, outs in PROJS}

        def step(
            mode: str, block_o=128, warps=4, split_mul=1.0, n=n, slots=slots, xs=xs, xw=xw, res=res
        ) -> None:
            for layer in layers:
                for name, k, _ in PROJS:
                    w, a, b, wide, seg = layer[name]
                    x, y_out = xs[k], res[name]
                    wide_kw = {"block_k": block_o, "splits": warps or None}  # (wide modes: their knobs)
                    if mode == "wide":  # the wide shrink ([x | y]) + one GEMM over [W | B]
                        xy = lora_wide_shrink(x, a, slots, scales, members=len(seg) + 1, **wide_kw)
                        torch.mm(xy, wide.t(), out=y_out)
                        continue
                    if mode == "wide_shrink":  # the wide shrink alone
                        lora_wide_shrink(x, a, slots, scales, members=len(seg) + 1, **wide_kw)
                        continue
                    if mode == "wide_gemm":  # the wide GEMM alone
                        torch.mm(xw[name], wide.t(), out=y_out)
                        continue
                    if mode == "overlap":
                        ev = torch.cuda.Event()
                        ev.record()
                        with torch.cuda.stream(side):
                            side.wait_event(ev)
                            y = lora_shrink(x, a, slots, scales)
                            done = torch.cuda.Event()
                            done.record()
                        torch.mm(x, w.t(), out=y_out)
                        torch.cuda.current_stream().wait_event(done)
                        lora_expand(y, b, slots, y_out, seg=seg)
                        continue
                    if mode != "lora_only":
                        torch.mm(x, w.t(), out=y_out)
                    if mode == "base":
                        continue
                    splits = None
                    if split_mul != 1.0:
                        from llmray.kernels.lora import _block_m, _num_splits

                        tiles = -(-n // _block_m(n))
                        splits = max(1, int(_num_splits(tiles, k, dev) * split_mul))
                    y = lora_shrink(x, a, slots, scales, splits=splits)
                    lora_expand(y, b, slots, y_out, seg=seg, block_o=block_o, num_warps=warps)

        variants = {
            "base_gemms": ("base",),
            "wide": ("wide", 128, 0),
            "lora": ("lora",),
            "wide_gemm_only": ("wide_gemm",),
            "wide_shrink_only": ("wide_shrink", 128, 0),
            "wide_no_split_k": ("wide", 128, 1),
            "wide_block_k_64": ("wide", 64, 0),
            "wide_block_k_256": ("wide", 256, 0),
            "wide_block_k_512_no_split_k": ("wide", 512, 1),
            "lora_only": ("lora_only",),
            "lora_block_o_256": ("lora", 256),
            "overlap_shrink": ("overlap",),
        }
        row: dict = {}
        out[f"{n}_rows"] = row
        try:  # split-K partial sums (inter-program tickets) against one program per tile, on the device
            errs = []
            for name, k, outs in PROJS:
                _, a, *_ = layers[0][name]
                one = lora_wide_shrink(xs[k], a, slots, scales, members=len(outs), splits=1).float()
                for _ in range(3):
                    many = lora_wide_shrink(xs[k], a, slots, scales, members=len(outs)).float()
                    errs.append((many - one).abs().max().item() / max(one.abs().max().item(), 1e-9))
            row["split_k_vs_one_program_max_rel_err"] = max(errs)
        except Exception as e:
            row["split_k_vs_one_program_max_rel_err"] = f"failed: {e!r}"[:300]
        print(f"micro rows={n} split-K check: {row['split_k_vs_one_program_max_rel_err']}", flush=True)
        for key, args in variants.items():
            try:
                row[key] = _graph_ms(lambda args=args: step(*args), reps=20 if n <= 1024 else 4)
            except Exception as e:  # one failing variant must not cost the others
                row[key] = f"failed: {e!r}"[:300]
            print(f"micro rows={n} {key}: {row[key]} ms", flush=True)
            save()


def _kernel_table(prof, wall_s: float, steps: int) -> dict:
    """Device ms per kernel (top 25) and per class over the profiled steps."""
    kernels = []
    for e in prof.key_averages():
        if "CUDA" not in str(getattr(e, "device_type", "")):
            continue
        ms = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1e3
        if ms > 0:
            kernels.append((e.key, ms, e.count))
    kernels.sort(key=lambda t: -t[1])
    classes: dict[str, float] = {}
    for key, ms, _ in kernels:
        low = key.lower()
        cls = (
            "lora_tall_expand" if "_tall_expand" in key
            else "lora_fused" if "_lora_delta_kernel" in key
            else "lora_wide_shrink" if "_wide_shrink_kernel" in key
            else "lora_shrink" if "_shrink_kernel" in key
            else "lora_expand" if "_expand_kernel" in key
            else "gemm" if any(s in low for s in ("gemm", "sm90", "cutlass", "nvjet", "cublas"))
            else "attention" if "attention" in low or "paged" in low or "decode" in low or "prefill" in low
            else "memcpy/fill" if "memcpy" in low or "fill" in low or "copy" in low
            else "other"
        )  # fmt: skip
        classes[cls] = classes.get(cls, 0.0) + ms
    total = sum(ms for _, ms, _ in kernels)
    return {
        "steps": steps,
        "wall_ms": round(wall_s * 1e3, 2),
        "wall_ms_per_step": round(wall_s * 1e3 / max(steps, 1), 3),
        "device_ms": round(total, 2),
        "device_ms_per_step": round(total / max(steps, 1), 3),
        "classes_ms_per_step": {k: round(v / max(steps, 1), 3) for k, v in sorted(classes.items())},
        "top_kernels": [[k[:90], round(ms, 3), c] for k, ms, c in kernels[:25]],
    }


def _profile_steps(llm, prompts, loras, output_len: int, phase: str) -> dict:
    """Profile 20 decode steps (after the prompts are in) or the prefill steps of a fresh batch."""
    from torch.profiler import ProfilerActivity, profile

    from llmray.engine.sampling_params import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    for i, (p, lora) in enumerate(zip(prompts, loras, strict=True)):
        engine.add_request(f"prof-{phase}-{i}", p, params, lora)
    prefill_steps = -(-sum(len(p) for p in prompts) // engine.config.max_num_batched_tokens) + 1
    if phase == "decode":
        for _ in range(prefill_steps + 2):
            engine.step()
        todo = 20
    else:
        todo = prefill_steps
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(todo):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    while engine.has_unfinished():
        engine.step()
    return _kernel_table(prof, wall, todo)


def engine_part(out_dir: Path, results: dict, save) -> None:
    import gc

    from lora import run, write_adapter

    from llmray.config import ModelConfig
    from llmray.engine.llm import LLM
    from llmray.model.qwen3 import Qwen3ForCausalLM

    compiles: list[tuple[str, float]] = []
    try:
        from triton.runtime.jit import JITFunction

        orig = JITFunction._do_compile

        def counted(self, *a, **k):
            t = time.perf_counter()
            try:
                return orig(self, *a, **k)
            finally:
                compiles.append(
                    (getattr(getattr(self, "fn", None), "__name__", "?"), time.perf_counter() - t)
                )

        JITFunction._do_compile = counted
    except (ImportError, AttributeError):
        pass
    config = ModelConfig.preset("qwen3-0.6b")
    torch.manual_seed(0)
    with torch.device("cuda"):  # (initialised on the device: seconds less than on the host)
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (256, 256), generator=g).tolist()
    eng: dict = {}
    results["engine"] = eng
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"a{i}" for i in range(16)]
        for i, name in enumerate(names):
            write_adapter(Path(tmp) / name, config, RANK, seed=i)
        t0 = time.perf_counter()
        llm = LLM.from_model(
            model, None, enable_prefix_caching=False, max_loras=16, max_lora_rank=RANK,
            loras={n: str(Path(tmp) / n) for n in names},
        )  # fmt: skip
        eng["startup_s"] = round(time.perf_counter() - t0, 2)
        eng["startup_triton_compiles"] = len(compiles)
        eng["startup_compile_s"] = round(sum(c[1] for c in compiles), 2)
        by: dict[str, int] = {}
        for name, _ in compiles:
            by[name] = by.get(name, 0) + 1
        eng["startup_compiles_by_kernel"] = by
        print("startup", eng, flush=True)
        save()
        lora16 = [names[i % 16] for i in range(256)]
        base = [None] * 256
        rows: dict = {}
        eng["rows"] = rows
        for key, loras in (
            ("16_adapters_first", lora16),
            ("base_on_lora_engine", base),
            ("16_adapters_warm", lora16),
        ):
            rows[key] = run(llm, prompts, loras, 256, 1, warmup_seqs=32, trace=True)
            print(key, {k: v for k, v in rows[key].items() if k != "trace"}, flush=True)
            save()
        ref = rows["base_on_lora_engine"]["tokens_per_s"]
        for row in rows.values():
            row["vs_base_on_lora_engine"] = round(row["tokens_per_s"] / ref, 3)
        save()
        prof: dict = {}
        eng["profile"] = prof
        for phase, key, loras in (
            ("decode", "16_adapters", lora16),
            ("decode", "base", base),
        ):
            prof[f"{phase}_{key}"] = _profile_steps(llm, prompts, loras, 64, phase)
            print(
                phase,
                key,
                {k: v for k, v in prof[f"{phase}_{key}"].items() if k != "top_kernels"},
                flush=True,
            )
            save()
        # A/B in the same engine: the split kernels only (shrink + expand after each base GEMM), graphs re-captured
        runner = llm.engine.runner
        llm.engine.lora.batch.wide_max_rows = 0
        t1 = time.perf_counter()
        runner.graphs.clear()
        torch.cuda.empty_cache()
        runner._cuda_graphs.capture()
        eng["split_recapture_s"] = round(time.perf_counter() - t1, 2)
        split = run(llm, prompts, lora16, 256, 1, warmup_seqs=None, trace=True)
        split["vs_base_on_lora_engine"] = round(split["tokens_per_s"] / ref, 3)
        rows["16_adapters_split_kernels"] = split
        print("split", {k: v for k, v in split.items() if k != "trace"}, flush=True)
        save()
        prof["decode_16_adapters_split_kernels"] = _profile_steps(llm, prompts, lora16, 64, "decode")
        save()
        prof["prefill_16_adapters_split_kernels"] = _profile_steps(llm, prompts, lora16, 64, "prefill")
        save()
        del llm
        gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--parts", default="engine,micro")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name()}

    def save() -> None:
        (out_dir / "lora_profile.json").write_text(json.dumps(results, indent=2))

    for part in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            if part == "micro":
                results["micro_ms_per_forward"] = {}
                micro(results["micro_ms_per_forward"], save)
            elif part == "engine":
                engine_part(out_dir, results, save)
        except Exception as e:  # keep what the other parts measured
            import traceback

            traceback.print_exc()
            results[f"{part}_error"] = repr(e)[:500]
        results[f"{part}_s"] = round(time.perf_counter() - t0, 1)
        save()
        print(part, "done in", results[f"{part}_s"], "s", flush=True)


if __name__ == "__main__":
    main()
