"""Fine-tuning costs on the qwen3-0.6b preset (random weights) at sequence length 1024.

Two parts:
1. ``params`` (CPU, meta device, no weights): trainable-parameter share of LoRA configurations, the
   reduction against full fine-tuning and the adapter's size on disk (a safetensors file of the adapter's
   shapes, fp32 as llmray saves adapters).
2. ``gpu``: peak GPU memory and tokens/s of one training step (forward + backward + AdamW) for full
   fine-tuning vs LoRA vs QLoRA at the same batch. Full fine-tuning: bf16 weights, grads and AdamW state
   (the leanest full fine-tune: a baseline that flatters full fine-tuning's memory). LoRA: bf16 frozen base,
   fp32 adapters, bf16 autocast. QLoRA: NF4 double-quantised base (bitsandbytes), bf16 compute, fp32
   adapters, gradient checkpointing. Ray is not involved: the step is timed directly with CUDA events.

    python bench/finetune.py params --out bench/results/finetune_params.json
    python bench/finetune.py gpu --out $OUT/finetune.json [--batch 8] [--steps 6] [--runs A,B] [--profile A]
    python bench/finetune.py gpu --preset tiny --device cpu --out /tmp/f.json   # CPU dry run: 2 x 64, 1 step (~30 s)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmray.config import LoraConfig, ModelConfig  # noqa: E402
from llmray.model.qwen3 import Qwen3ForCausalLM  # noqa: E402
from llmray.train import adapters, peft_adapters  # noqa: E402

PRESET = "qwen3-0.6b"
PARAM_CONFIGS = [("attn", 4), ("attn", 8), ("all-attn", 8), ("all-linear", 8), ("all-linear", 16)]


def bench_params() -> dict:
    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    cfg = ModelConfig.preset(PRESET)
    rows = []
    for targets, r in PARAM_CONFIGS:
        with torch.device("meta"):
            model = Qwen3ForCausalLM(cfg, kernels="torch")
        full = model.num_params()
        for p in model.parameters():
            p.requires_grad_(False)
        pm = get_peft_model(model, peft_adapters.peft_config(LoraConfig(r=r, alpha=2 * r, targets=targets)))
        trainable, _ = peft_adapters.trainable_parameters(pm)
        state = get_peft_model_state_dict(pm)
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "adapter_model.safetensors"
            save_file({k: torch.zeros(v.shape, dtype=torch.float32) for k, v in state.items()}, str(file))
            size = file.stat().st_size
        rows.append(
            {
                "targets": targets,
                "target_modules": LoraConfig(targets=targets).target_modules(),
                "r": r,
                "trainable_params": trainable,
                "full_params": full,
                "trainable_share_pct": round(100 * trainable / full, 4),
                "reduction_vs_full": round(full / trainable, 1),
                "adapter_bytes_fp32": size,
                "adapter_mb_fp32": round(size / 2**20, 2),
                "reaches_1000x": full / trainable >= 1000,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"preset": PRESET, "configs": rows}


def _build(mode: str, targets: str, r: int, kernels: str, device: torch.device, preset: str, impl: str):
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(ModelConfig.preset(preset), kernels=kernels).to(torch.bfloat16)
    if mode == "full":
        return model.train(), list(model.parameters())
    cfg = LoraConfig(r=r, alpha=2 * r, targets=targets, qlora=mode == "qlora")
    if impl == "peft":
        pm = peft_adapters.apply_lora(model, cfg, device, "bfloat16", gradient_checkpointing=mode == "qlora")
    else:  # llmray's own layers (the default of llmray finetune)
        if cfg.qlora:
            peft_adapters.quantize_nf4(model, device, torch.bfloat16)
        pm = adapters.apply_lora(model, cfg)
        if cfg.qlora:
            pm.gradient_checkpointing_enable()
    return pm.train(), [p for p in pm.parameters() if p.requires_grad]


def bench_step(
    mode: str,
    targets: str,
    r: int,
    batch: int,
    seq: int,
    steps: int,
    kernels: str,
    device: str,
    preset: str,
    impl: str = "ours",
    graphs: bool = False,
    profile: bool = False,
) -> dict:
    """One configuration's step time and peak memory (``device="cpu"`` only checks the script runs).

    The step is the harness's own (``llmray.train.harness.train_step``: bf16 autocast, clipping, fused
    AdamW inside the timed step); ``graphs``: forward + backward replayed from a CUDA graph
    (``llmray.train.graphs.StepGraphs``), as ``llmray finetune`` runs on one GPU."""
    from llmray.train.graphs import StepGraphs
    from llmray.train.harness import train_step

    device = torch.device(device)
    cuda = device.type == "cuda"
    gc.collect()  # earlier runs' models (LoRA sibling groups are reference cycles) leave before this one
    if cuda:
        torch.cuda.empty_cache()
    model, params = _build(mode, targets, r, kernels, device, preset, impl)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda or None)
    vocab = ModelConfig.preset(preset).vocab_size
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=g)
    tgt = torch.randint(0, vocab, (batch, seq), device=device, generator=g)
    weights_bytes = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dtype = torch.bfloat16 if cuda else torch.float32
    sg = StepGraphs(model, params, device, dtype) if graphs and cuda else None

    def step() -> torch.Tensor:
        return train_step(model, [(ids, tgt)], 1, opt, params, device, dtype, 1.0, graphs=sg)[0]

    for _ in range(4):  # warm-up (optimizer state allocated, kernels compiled, graph captured)
        step()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if cuda:
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / steps
    else:
        ms = (time.perf_counter() - t0) * 1000 / steps
    trainable, total = peft_adapters.trainable_parameters(model)
    row = {
        "mode": mode,
        "lora_impl": None if mode == "full" else impl,
        "targets": None if mode == "full" else targets,
        "r": None if mode == "full" else r,
        "kernels": kernels,
        "cuda_graphs": sg is not None and sg.replays > 0,
        "graph_failure": sg.failed if sg is not None else None,
        "batch": batch,
        "seq_len": seq,
        "step_ms": round(ms, 2),
        "tokens_per_s": round(batch * seq / ms * 1000, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "model_mem_gib": round(weights_bytes / 2**30, 3),
        "trainable_params": trainable,
        "total_params": total,
        "gradient_checkpointing": mode == "qlora",
        "final_loss": round(float(loss.detach()), 4),
    }
    if profile and cuda:
        row["profile"] = _profile(step)
    if mode != "full":
        with tempfile.TemporaryDirectory() as tmp:
            save = adapters.save_adapter if impl == "ours" else peft_adapters.save_adapter
            out = save(model, Path(tmp) / "a", None)
            row["adapter_bytes"] = (out / "adapter_model.safetensors").stat().st_size
    return row


def _profile(step, n: int = 2) -> dict:
    """GPU kernel time per step (summed) against wall time, and the 12 costliest kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) * 1e3 / n
    kernels = [e for e in prof.key_averages() if getattr(e, "device_type", None) is not None
               and "CUDA" in str(e.device_type)]  # fmt: skip
    busy = sum(e.self_device_time_total for e in kernels) / 1e3 / n
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]
    return {
        "wall_ms_per_step_profiled": round(wall, 2),
        "gpu_kernel_ms_per_step": round(busy, 2),
        "kernels_per_step": sum(e.count for e in kernels) // n,
        "top": [[e.key[:90], e.count // n, round(e.self_device_time_total / 1e3 / n, 3)] for e in top],
    }


RUNS = {  # name -> (mode, targets, r, lora_impl, cuda graphs)
    "full": ("full", "", 0, "-", False),
    "full+graphs": ("full", "", 0, "-", True),
    "ours/attn/r8": ("lora", "attn", 8, "ours", False),
    "ours/attn/r8+graphs": ("lora", "attn", 8, "ours", True),
    "ours/all-linear/r16": ("lora", "all-linear", 16, "ours", False),
    "ours/all-linear/r16+graphs": ("lora", "all-linear", 16, "ours", True),
    "peft/attn/r8": ("lora", "attn", 8, "peft", False),
    "peft/all-linear/r16": ("lora", "all-linear", 16, "peft", False),
    "peft/attn/r8+graphs": ("lora", "attn", 8, "peft", True),
    "peft/all-linear/r16+graphs": ("lora", "all-linear", 16, "peft", True),
    "qlora/ours/all-linear/r16": ("qlora", "all-linear", 16, "ours", False),
}
DEFAULT_RUNS = ("full+graphs,ours/attn/r8+graphs,ours/all-linear/r16+graphs,qlora/ours/all-linear/r16,full,"
                "peft/attn/r8,peft/all-linear/r16,ours/attn/r8,ours/all-linear/r16")  # fmt: skip


def bench_gpu(args: argparse.Namespace) -> dict:
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "runs": {},
        "errors": [],
    }
    details = Path(args.out).with_name(Path(args.out).stem + "_details.json")
    profiled = set(args.profile.split(",")) if args.profile else set()
    for name in args.runs.split(","):
        mode, targets, r, impl, graphs = RUNS[name]
        t = time.perf_counter()
        try:
            row = bench_step(mode, targets, r, args.batch, args.seq_len, args.steps, "auto", args.device,
                             args.preset, impl, graphs, profile=name in profiled)  # fmt: skip
        except Exception as e:  # recorded in the result; the other runs go on
            result["errors"].append(
                {"run": name, "error": repr(e)[:400], "trace": traceback.format_exc()[-1500:]}
            )
            print(f"{name} failed: {e!r}", flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
            continue
        row["bench_s"] = round(time.perf_counter() - t, 1)
        result["runs"][name] = row
        print(name, json.dumps(row), flush=True)
        _summarise(result)
        details.write_text(json.dumps(result, indent=2))  # after each run: a timeout keeps the rest
        keys = ("device", "lora_attn_r8_over_full", "lora_all_linear_r16_over_full", "qlora_mem_over_full")
        Path(args.out).write_text(json.dumps({k: result.get(k) for k in keys}, indent=2))
    return result


def _summarise(result: dict) -> None:
    """Each LoRA run against full fine-tuning run the same way (CUDA graphs or eager); the issue's keys
    from llmray's default (our layers, graphs on one GPU; eager where the graph run is missing)."""
    runs = result["runs"]
    summary = {}
    for name, row in runs.items():
        if row["mode"] == "full":
            continue
        full = runs.get("full+graphs" if name.endswith("+graphs") else "full")
        if full is None:
            continue
        summary[name] = {
            "tokens_per_s_vs_full": round(row["tokens_per_s"] / full["tokens_per_s"], 3),
            "peak_mem_vs_full": round(row["peak_mem_gib"] / full["peak_mem_gib"], 3)
            if full["peak_mem_gib"]
            else None,
        }
    result["summary"] = summary
    for key, name in (("lora_attn_r8_over_full", "ours/attn/r8"),
                      ("lora_all_linear_r16_over_full", "ours/all-linear/r16")):  # fmt: skip
        for n in (name + "+graphs", name):
            if n in summary:
                result[key] = summary[n]["tokens_per_s_vs_full"]
                break
    if "qlora/ours/all-linear/r16" in summary:
        result["qlora_mem_over_full"] = summary["qlora/ours/all-linear/r16"]["peak_mem_vs_full"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("params", "gpu"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=None, help="default 8 (CUDA), 2 (CPU dry run)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 1024 (CUDA), 64 (CPU dry run)")
    ap.add_argument("--steps", type=int, default=None, help="default 6 (CUDA), 1 (CPU dry run)")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"gpu part: comma-separated, of {', '.join(RUNS)}")
    ap.add_argument("--profile", default="", help="gpu part: runs to profile (GPU kernel time vs wall)")
    ap.add_argument("--preset", default=PRESET, help="gpu part only (tiny + --device cpu: a dry run)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    cpu = args.device == "cpu"  # a dry run: small enough to finish in about a minute on a laptop core
    args.batch = args.batch or (2 if cpu else 8)
    args.seq_len = args.seq_len or (64 if cpu else 1024)
    args.steps = args.steps or (1 if cpu else 6)
    t0 = time.time()
    if args.part == "params":
        result = bench_params()
        result["command"] = " ".join(sys.argv)
        Path(args.out).write_text(json.dumps(result, indent=2))
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("the gpu part needs CUDA (or --device cpu --preset tiny for a dry run)")
        if "+graphs" not in args.runs:  # graph capture keeps to the default allocator settings
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        bench_gpu(args)
    print(f"done in {time.time() - t0:.1f}s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
