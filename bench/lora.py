"""Multi-LoRA throughput: one engine, a workload spread over 0, 1, 4 and 16 adapters (rank 16, all-linear).

Qwen3-0.6B shapes with random bf16 weights; adapters are random PEFT directories written at start.
Rows: base model on an engine without LoRA, base requests on the LoRA engine, then 1/4/16 adapters
(requests assigned round-robin). Target: 16 adapters >= 85% of base throughput. ``--wait-for FILE``:
build the models and write the adapters first, then wait for FILE (another benchmark finishing on the GPU).

    python bench/lora.py --out bench/results/lora.json [--num-seqs 256 --prompt-len 256 --output-len 256]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmray.config import ModelConfig
from llmray.engine.llm import LLM
from llmray.engine.sampling_params import SamplingParams
from llmray.lora.adapter import MODULES, module_shape
from llmray.model.qwen3 import Qwen3ForCausalLM


def write_adapter(path: Path, config: ModelConfig, rank: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in MODULES:
            fan_in, fan_out = module_shape(config, module)
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g) / fan_in**0.5).to(
                torch.bfloat16
            )
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g) * 0.01).to(
                torch.bfloat16
            )
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(MODULES),
        "bias": "none",
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def run(
    llm: LLM,
    prompts: list[list[int]],
    loras: list[str | None],
    output_len: int,
    repeats: int,
    warmup_seqs: int | None = None,
    trace: bool = False,
) -> dict:
    """Best of ``repeats`` timed runs of the whole workload, after one untimed warm-up run of it (or of its
    first ``warmup_seqs`` requests with 8 output tokens: adapters into their slots, a shorter window)."""
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    if warmup_seqs:  # every adapter of the row still loads (requests are assigned round-robin)
        short = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)
        llm.generate(prompts[:warmup_seqs], short, lora=loras[:warmup_seqs])
    else:  # warm-up: the same workload (Triton compiles, adapter slots)
        llm.generate(prompts, params, lora=loras)
    walls = []
    tracer = None
    if trace:  # what each timed run paid (bench/engine_trace.py: phases, Triton compiles, GC, allocator)
        from engine_trace import RunTracer

        tracer = RunTracer(llm.engine)
    for i in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if tracer is not None:
            with tracer.run(f"run {i + 1}"):
                outs = llm.generate(prompts, params, lora=loras)
        else:
            outs = llm.generate(prompts, params, lora=loras)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    tokens = sum(len(o.token_ids) for o in outs)
    wall = min(walls)
    row = {
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "walls_s": [round(w, 3) for w in walls],
        "tokens_per_s": round(tokens / wall, 1),
    }
    if tracer is not None:
        row["trace"] = tracer.runs
    return row


def best_config(path: str, name: str) -> tuple[int, ...] | None:
    """The lora_fused config of class ``name`` ("wide": q|k|v + gate|up, "narrow": o + down at 256 rows,
    "prefill": all at 8192 rows) that was fastest in bench/lora_fused.py's JSON (the current one for
    "fused_default"; None when the split kernels were faster)."""
    from llmray.kernels import lora_fused

    projs = {"wide": ("qkv", "gate_up"), "narrow": ("o", "down")}.get(name, ("all",))
    rows = json.loads(Path(path).read_text())["rows"]["8192_rows" if name == "prefill" else "256_rows"]
    timed = {
        key: sum(row[p] for p in projs)
        for key, row in rows.items()
        if key.startswith("fused_")
        and isinstance(row, dict)
        and all(isinstance(row.get(p), float) for p in projs)
    }
    best = min(timed, key=timed.__getitem__)
    split = sum(rows["split"][p] for p in projs)
    print(f"best {name} config: {best} ({timed[best]:.4f} ms; split {split:.4f})", flush=True)
    if timed[best] >= split:
        return None
    if best == "fused_default":
        return lora_fused.CONFIGS[name]
    return tuple(int(v) for v in best.removeprefix("fused_").split("x"))


def recapture(llm: LLM) -> None:
    """Capture the engine's CUDA graphs again (after a change to the LoRA kernels' launch settings)."""
    runner = llm.engine.runner
    runner.graphs.clear()
    torch.cuda.empty_cache()
    runner._cuda_graphs.capture()


def kernel_times(rank: int) -> dict:
    """One LoRA'd linear (1024 -> 3072, bf16) at decode (256 rows) and prefill (8192 rows) sizes: our
    shrink+expand against the torch gather reference, rows sorted by slot as the runner packs them."""
    from triton.testing import do_bench

    from llmray.kernels.lora import lora_delta_ref, lora_expand, lora_shrink

    out = {}
    for rows in (256, 8192):
        for slots_used in (1, 16):
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
            a = torch.randn(16, rank, 1024, device="cuda", dtype=torch.bfloat16, generator=g) / 32
            b = torch.randn(16, 3072, rank, device="cuda", dtype=torch.bfloat16, generator=g) / 4
            slots = (torch.arange(rows, device="cuda") * slots_used // rows).to(torch.int32)
            scales = torch.ones(16, device="cuda")
            y = torch.zeros(rows, 3072, device="cuda", dtype=torch.bfloat16)
            ours = do_bench(lambda: lora_expand(lora_shrink(x, a, slots, scales), b, slots, y))  # noqa: B023
            ref = do_bench(lambda: y.add_(lora_delta_ref(x, a, b, slots, scales).to(y.dtype)))  # noqa: B023
            w = torch.randn(3072, 1024, device="cuda", dtype=torch.bfloat16)
            base = do_bench(lambda: x @ w.t())  # noqa: B023
            out[f"{rows}_rows_{slots_used}_adapters"] = {
                "lora_ms": round(ours, 4),
                "torch_gather_ms": round(ref, 4),
                "base_matmul_ms": round(base, 4),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/lora.json")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-kernels", action="store_true", help="no shrink/expand kernel timings")
    ap.add_argument("--adapters", default="16,1,4,0", help="adapter counts of the LoRA-engine rows, in order")
    ap.add_argument("--warmup-seqs", type=int, default=None, help="warm-up run on this many requests only")
    ap.add_argument(
        "--ab-split",
        action="store_true",
        help="then 16 adapters again on the split kernels only (GEMM + shrink + expand per projection: fused "
        "decode path and wide path off, graphs re-captured)",
    )
    ap.add_argument(
        "--ab-fused",
        action="append",
        default=[],
        metavar="ROW:NAME=CFG[,NAME=CFG]",
        help="then 16 adapters again with lora_fused.CONFIGS[NAME] set to CFG (BMxBNxBKxTxWARPSxSTAGES; "
        "none: split kernels; best@FILE: the fastest in bench/lora_fused.py's JSON; NAME=max_rows sets "
        "LoraBatch.fused_max_rows, tall=N LoraBatch.tall_max_rows, swiglu=0/1 LoraBatch.fuse_swiglu, pdl=0/1 kernels.lora.PDL), graphs re-captured, "
        "as row ROW "
        "(before --ab-split)",
    )
    ap.add_argument(
        "--trace", action="store_true", help="per timed run: phases, Triton compiles, GC (each row)"
    )
    ap.add_argument(
        "--profile-decode",
        action="store_true",
        help="last: torch.profiler over 20 decode steps of the LoRA engine with 16 adapters and with none "
        "(device ms per kernel class vs wall ms per step; bench/lora_profile.py)",
    )
    ap.add_argument(
        "--wait-for",
        default=None,
        help="prepare (models, adapters), then wait for this file before any engine",
    )
    args = ap.parse_args()
    config = ModelConfig.preset(args.preset)
    torch.manual_seed(0)
    with torch.device("cpu" if args.wait_for else "cuda"):  # on the device unless it is busy: seconds less
        model = Qwen3ForCausalLM(config).to("cuda", torch.bfloat16)
        lora_model = Qwen3ForCausalLM(config).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (args.num_seqs, args.prompt_len), generator=g).tolist()
    results: dict = {"workload": vars(args), "device": torch.cuda.get_device_name(), "rows": {}}

    def save() -> None:  # after every row: a run cut short by a time limit still leaves its rows
        rows = results["rows"]
        ref = rows["base_engine_without_lora"]["tokens_per_s"]
        for row in rows.values():
            row["vs_base"] = round(row["tokens_per_s"] / ref, 3)
        if "16_adapters" in rows:  # issue 17's target: 16 adapters >= 0.85 x base
            results["adapters_16_over_base"] = rows["16_adapters"]["vs_base"]
            results["target_16_adapters_ge_0.85x_base"] = rows["16_adapters"]["vs_base"] >= 0.85
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        names = [f"a{i}" for i in range(16)]
        for i, name in enumerate(names):
            write_adapter(Path(tmp) / name, config, args.rank, seed=i)
        if args.wait_for:  # (another benchmark holds the GPU until it writes this file)
            print("prepared; waiting for", args.wait_for, flush=True)
            while not Path(args.wait_for).exists():
                time.sleep(0.05)
        base = LLM.from_model(model, None, enable_prefix_caching=False)
        results["rows"]["base_engine_without_lora"] = run(
            base, prompts, [None] * len(prompts), args.output_len, args.repeats, args.warmup_seqs, args.trace
        )
        print("base", results["rows"]["base_engine_without_lora"], flush=True)
        save()
        del base
        gc.collect()
        torch.cuda.empty_cache()
        llm = LLM.from_model(
            lora_model,
            None,
            enable_prefix_caching=False,
            max_loras=16,
            max_lora_rank=args.rank,
            loras={n: str(Path(tmp) / n) for n in names},
        )
        for k in (int(c) for c in args.adapters.split(",")):  # the target row first
            loras = [names[i % k] if k else None for i in range(len(prompts))]
            key = f"{k}_adapters" if k else "base_on_lora_engine"
            results["rows"][key] = run(
                llm, prompts, loras, args.output_len, args.repeats, args.warmup_seqs, args.trace
            )
            print(key, results["rows"][key], flush=True)
            save()
        for spec in args.ab_fused:  # the same engine with other fused-kernel launch parameters
            from llmray.kernels import lora_fused

            row, _, sets = spec.partition(":")
            for item in sets.split(","):
                name, _, cfg = item.partition("=")
                if name == "max_rows":
                    llm.engine.lora.batch.fused_max_rows = int(cfg)
                elif name == "tall":  # steps of at most this many rows on the tall layout's GEMM + expand
                    llm.engine.lora.batch.tall_max_rows = int(cfg)
                elif name == "swiglu":  # tall gate|up: expand + gated SwiGLU in one kernel (1) or two (0)
                    llm.engine.lora.batch.fuse_swiglu = bool(int(cfg))
                elif name == "pdl":  # programmatic dependent launch of the shrink/expand on or off
                    from llmray.kernels import lora as lora_kernels

                    lora_kernels.PDL = bool(int(cfg))
                elif cfg.startswith("best@"):  # the fastest in bench/lora_fused.py's results (256 rows)
                    lora_fused.CONFIGS[name] = best_config(cfg[5:], name)  # type: ignore[assignment]
                else:
                    lora_fused.CONFIGS[name] = (  # type: ignore[assignment]
                        None if cfg == "none" else tuple(int(v) for v in cfg.split("x"))
                    )
            recapture(llm)
            loras = [names[i % 16] for i in range(len(prompts))]
            results["rows"][row] = run(
                llm, prompts, loras, args.output_len, args.repeats, args.warmup_seqs, args.trace
            )
            from llmray.kernels import lora as lora_kernels

            results["rows"][row]["fused_configs"] = {**lora_fused.CONFIGS}
            results["rows"][row]["pdl"] = lora_kernels.PDL
            print(row, results["rows"][row], flush=True)
            save()
        if args.ab_split:  # the same engine with every step on the split GEMM + shrink + expand kernels
            llm.engine.lora.batch.wide_max_rows = 0
            llm.engine.lora.batch.fused_max_rows = 0
            recapture(llm)
            loras = [names[i % 16] for i in range(len(prompts))]
            results["rows"]["16_adapters_split_kernels"] = run(
                llm, prompts, loras, args.output_len, args.repeats, args.warmup_seqs, args.trace
            )
            print("16_adapters_split_kernels", results["rows"]["16_adapters_split_kernels"], flush=True)
            save()
        if args.profile_decode:  # host vs device per decode step, with the settings of the last row
            from lora_profile import _profile_steps

            prof = results["decode_profile"] = {}
            for key, loras in (("16_adapters", [names[i % 16] for i in range(len(prompts))]), ("base", None)):
                rows = loras or [None] * len(prompts)
                prof[key] = _profile_steps(llm, prompts, rows, 64, "decode")
                print("decode profile", key, {k: v for k, v in prof[key].items() if k != "top_kernels"})
                save()
    if not args.skip_kernels:
        results["kernels"] = kernel_times(args.rank)
    save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
