"""Data-parallel pretraining scaling under Ray Train: 1 GPU, then N GPUs with DDP and with FSDP2.

Each configuration is one ``TorchTrainer`` run (``ScalingConfig(num_workers, use_gpu)``) whose workers:

1. throughput: the ``--preset`` model (default ``qwen3-0.6b``) at ``--batch`` x ``--seq`` per GPU (default
   8 x 2048, as bench/train.py's single-GPU number), bf16 autocast, Muon + AdamW, gradient clipping,
   compiled per decoder block (``--compile blocks``: one graph for all blocks, so compile time stays short
   and the same compiled code serves 1 GPU, DDP and FSDP2); ``--warmup`` steps (compile included) are
   not timed, then ``--steps`` timed steps. Global batch = N x per-GPU batch.
2. loss agreement: a fresh model trained ``--agree-steps`` steps (eager) at the same global batch
   ``--agree-batch`` on every configuration (N GPUs take ``agree-batch / N`` rows each: the same rows), on
   byte-level tokens of ``--data`` (TinyShakespeare when present, else a synthetic learnable stream).

Reported: tokens/s per configuration, per-GPU MFU, scaling efficiency tok/s(N) / (N x tok/s(1)), the loss
curves and their largest difference from 1 GPU's, and an all-reduce bus bandwidth probe. NCCL's NVLink
multicast stays off (``NCCL_NVLS_ENABLE=0`` in every worker's environment through ``runtime_env``).

    python bench/multigpu.py --out $OUT/multigpu.json                                  # N GPUs
    python bench/multigpu.py --device cpu --preset tiny --num-workers 2 --seq 64 --batch 2 --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T0 = time.perf_counter()
# NVLink multicast off in NCCL, PyTorch symmetric memory and NVSHMEM, in every process (workers included)
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def log(msg: str) -> None:
    print(f"[multigpu {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# --- data -----------------------------------------------------------------------------------------------
def load_tokens(path: str | None, n_synthetic: int = 1_000_000) -> tuple[np.ndarray, str]:
    """Byte ids of a text file, or a synthetic stream where each byte has 3 possible successors."""
    if path and Path(path).is_file():
        return np.frombuffer(Path(path).read_bytes(), dtype=np.uint8).astype(np.int64), f"bytes of {path}"
    rng = np.random.default_rng(0)
    succ = rng.integers(0, 256, size=(256, 3))
    picks = rng.integers(0, 3, size=n_synthetic)
    out = np.empty(n_synthetic, dtype=np.int64)
    out[0] = 0
    for i in range(1, n_synthetic):
        out[i] = succ[out[i - 1], picks[i]]
    return out, "synthetic 256-symbol Markov stream (3 successors each)"


def global_batch(tokens: np.ndarray, step: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """The step's (batch, seq + 1) windows, the same on every rank; ranks slice their rows."""
    rng = np.random.default_rng(seed * 1_000_003 + step)
    starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
    return tokens[starts[:, None] + np.arange(seq + 1)[None, :]]


# --- the Ray Train worker ---------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(cfg: dict, device: torch.device, world: int, compile_mode: str):
    from llmray.config import ModelConfig
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.train.fsdp import parallelize
    from llmray.train.loop import build_optimizer

    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank and configuration
    model = Qwen3ForCausalLM(ModelConfig.preset(cfg["preset"]), kernels="torch").to(device).train()
    param_dtype = torch.bfloat16 if cfg["fsdp_param_dtype"] == "bf16" else None
    fwd = parallelize(model, cfg["parallel"], world, device, compile_mode, fsdp_param_dtype=param_dtype)
    opt = build_optimizer(model, "muon", lr=cfg["lr"], muon_lr=cfg["muon_lr"])
    return model, fwd, opt


def _step(model, fwd, opt, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    from llmray.train.loop import autocast_context

    with autocast_context(device):
        loss = fwd(x[:, :-1], targets=x[:, 1:])  # (B, T) -> mean loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _allreduce_busbw(device: torch.device, world: int, mib: int = 256, iters: int = 10) -> float | None:
    """NCCL all-reduce bus bandwidth in GB/s (nccl-tests' definition: 2 (n-1)/n x bytes / time)."""
    import torch.distributed as dist

    if world < 2 or device.type != "cuda":
        return None
    x = torch.ones(mib * 2**20 // 4, device=device)
    for _ in range(3):
        dist.all_reduce(x)
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    _sync(device)
    dt = (time.perf_counter() - t) / iters
    return 2 * (world - 1) / world * x.numel() * 4 / dt / 1e9


def train_worker(cfg: dict) -> None:
    """Throughput, then loss agreement; rank 0 writes ``cfg['result_path']``."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from llmray.config import ModelConfig
    from llmray.train.fsdp import to_float
    from llmray.train.loop import lr_multiplier, mfu, set_lr

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    barrier = dist.barrier if world > 1 else (lambda: None)
    out: dict[str, Any] = {
        "world": world,
        "parallel": cfg["parallel"] if world > 1 else "single",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "worker_env": {k: os.environ.get(k) for k in NCCL_ENV},
    }

    # 1. throughput at the per-GPU batch
    b, seq = cfg["batch"], cfg["seq"]
    vocab = ModelConfig.preset(cfg["preset"]).vocab_size
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randint(0, vocab, (b, seq + 1), generator=gen).to(device)  # random tokens: speed only
    t = time.perf_counter()
    model, fwd, opt = _build(cfg, device, world, cfg["compile"])
    for _ in range(cfg["warmup"]):
        _step(model, fwd, opt, x, device)
    _sync(device)
    barrier()
    out["warmup_s_incl_build_and_compile"] = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(cfg["steps"]):
        loss = _step(model, fwd, opt, x, device)
    _sync(device)
    barrier()
    dt = time.perf_counter() - t
    tok_s = world * b * seq * cfg["steps"] / dt
    mc = ModelConfig.preset(cfg["preset"])
    out.update(
        tokens_per_s=tok_s,
        tokens_per_s_per_gpu=tok_s / world,
        mfu_per_gpu=mfu(tok_s / world, mc, seq) if device.type == "cuda" else None,
        step_s=dt / cfg["steps"],
        global_batch=world * b,
        last_loss=float(loss),
        peak_mem_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    )
    if rank == 0:
        log(f"{out['parallel']} x{world}: {tok_s:,.0f} tok/s ({dt / cfg['steps']:.3f} s/step)")
    del model, fwd, opt, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["allreduce_busbw_gbs"] = _allreduce_busbw(device, world) if cfg["parallel"] == "ddp" else None

    # 2. loss agreement at one global batch, eager
    tokens, _ = load_tokens(cfg["data"])
    gb = cfg["agree_batch"]
    if gb % world:
        raise ValueError(f"--agree-batch {gb} must be a multiple of the number of workers {world}")
    per = gb // world
    model, fwd, opt = _build(cfg, device, world, "none")
    losses = []
    for step in range(cfg["agree_steps"]):
        set_lr(opt, lr_multiplier(step, cfg["agree_steps"], cfg["agree_warmup"], "constant"))
        rows = global_batch(tokens, step, gb, cfg["agree_seq"])[rank * per : (rank + 1) * per]
        loss = _step(model, fwd, opt, torch.from_numpy(rows).to(device), device)
        if world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # the global batch's mean (equal row counts)
        losses.append(to_float(loss))
    out["agree_losses"] = losses
    del model, fwd, opt
    if rank == 0:
        Path(cfg["result_path"]).write_text(json.dumps(out))


# --- the driver -------------------------------------------------------------------------------------------
def run_config(args, name: str, world: int, parallel: str, use_gpu: bool) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    result_path = Path(args.work_dir) / f"{name}.json"
    result_path.unlink(missing_ok=True)
    cfg = {
        "preset": args.preset, "parallel": parallel, "batch": args.batch, "seq": args.seq,
        "warmup": args.warmup, "steps": args.steps, "compile": args.compile, "seed": 0, "lr": args.lr,
        "muon_lr": args.muon_lr, "data": args.data, "agree_batch": args.agree_batch,
        "agree_seq": args.agree_seq or args.seq, "agree_steps": args.agree_steps,
        "agree_warmup": args.agree_warmup, "result_path": str(result_path),
        "fsdp_param_dtype": args.fsdp_param_dtype,
    }  # fmt: skip
    resources = {"CPU": args.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    t = time.perf_counter()
    from bench.multigpu import train_worker as worker  # by reference: workers import it (PYTHONPATH)

    trainer = TorchTrainer(
        worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"multigpu-{name}", storage_path=str(Path(args.work_dir) / "ray")),
    )
    result = trainer.fit()
    if result.error is not None or not result_path.exists():
        raise RuntimeError(f"{name}: the Ray Train run failed: {result.error}")
    res = json.loads(result_path.read_text())
    res["run_wall_s_incl_ray_start"] = time.perf_counter() - t
    return res


def summarize(results: dict[str, Any], tol: float) -> None:
    runs = results["runs"]
    single = runs.get("single")
    if not single:
        return
    base = single["tokens_per_s"]
    results["scaling"] = {
        name: {
            "gpus": r["world"],
            "tokens_per_s": round(r["tokens_per_s"]),
            "speedup": r["tokens_per_s"] / base,
            "scaling_efficiency": r["tokens_per_s"] / (r["world"] * base),
        }
        for name, r in runs.items()
    }
    ref = np.array(single["agree_losses"])
    agreement = {}
    for name, r in runs.items():
        if name == "single":
            continue
        diff = np.abs(np.array(r["agree_losses"]) - ref)
        agreement[name] = {"max_abs_diff": float(diff.max()), "final_abs_diff": float(diff[-1]),
                           "within_tolerance": bool(diff.max() <= tol)}  # fmt: skip
    results["loss_agreement"] = {
        "tolerance": tol,
        "first_loss": float(ref[0]),
        "last_loss": float(ref[-1]),
        **agreement,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", default=str(Path(os.environ.get("OUT", ROOT / "bench" / "results")) / "multigpu.json")
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--num-workers", type=int, default=0, help="N (default: torch.cuda.device_count())")
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--parallel", default="ddp,fsdp", help="the N-worker rows to run")
    p.add_argument("--batch", type=int, default=8, help="sequences per GPU per step (throughput)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compile included)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--compile", choices=("none", "blocks", "model"), default="blocks")
    p.add_argument(
        "--fsdp-param-dtype",
        choices=("fp32", "bf16"),
        default="bf16",
        help="FSDP2 all-gather/compute dtype (MixedPrecisionPolicy; gradients reduced in fp32)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--data", default=str(ROOT / ".data" / "tinyshakespeare" / "input.txt"))
    p.add_argument("--agree-batch", type=int, default=8, help="global batch of the loss-agreement runs")
    p.add_argument("--agree-seq", type=int, default=0, help="default: --seq")
    p.add_argument("--agree-steps", type=int, default=30)
    p.add_argument("--agree-warmup", type=int, default=5)
    p.add_argument("--agree-tol", type=float, default=0.05, help="max |loss(N) - loss(1)| (bf16 on GPU)")
    p.add_argument("--cpus-per-worker", type=float, default=0)
    p.add_argument("--work-dir", default="/tmp/llmray-multigpu")
    args = p.parse_args()

    use_gpu = args.device == "cuda"
    if use_gpu and not torch.cuda.is_available():
        print("bench/multigpu.py --device cuda needs GPUs (or --device cpu --preset tiny)", file=sys.stderr)
        return 2
    n = args.num_workers or (torch.cuda.device_count() if use_gpu else 2)
    args.cpus_per_worker = args.cpus_per_worker or (2.0 if use_gpu else 1.0)
    if args.compile == "model" and "fsdp" in args.parallel:
        raise SystemExit("--compile model is DDP-only; FSDP2 compiles per block (--compile blocks)")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    os.environ.update(NCCL_ENV)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    pythonpath = os.environ.get("PYTHONPATH", "")
    ray.init(
        num_cpus=max(8, os.cpu_count() or 8),
        include_dashboard=False,
        # every worker process of the job gets these; the repo root makes bench.multigpu importable there
        runtime_env={"env_vars": {**NCCL_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), pythonpath])}},
    )
    _, data_desc = load_tokens(args.data, n_synthetic=10)
    results: dict[str, Any] = {
        "bench": "multigpu pretraining",
        "command": "python " + " ".join(sys.argv),
        "device": args.device,
        "device_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if use_gpu
        else ["cpu"],
        "torch": torch.__version__,
        "ray": ray.__version__,
        "num_workers": n,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
        "agree_data": data_desc,
        "nccl_env": NCCL_ENV,
        "runs": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["script_wall_s"] = time.perf_counter() - T0
        summarize(results, args.agree_tol)
        out.write_text(json.dumps(results, indent=1))

    plan = [("single", 1, "ddp")] + [(par, n, par) for par in args.parallel.split(",") if par]
    for name, world, parallel in plan:
        log(f"run {name}: {world} worker(s), {parallel}")
        try:
            results["runs"][name] = run_config(args, name, world, parallel, use_gpu)
        except Exception as e:  # keep the other rows; the error is in the JSON
            results.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:2000]}"
            log(f"run {name} failed: {e}")
        save()
        if name in results["runs"]:
            r = results["runs"][name]
            log(f"{name}: {r['tokens_per_s']:,.0f} tok/s, agree losses {r['agree_losses'][0]:.3f} -> "
                f"{r['agree_losses'][-1]:.3f}, wall {r['run_wall_s_incl_ray_start']:.0f}s")  # fmt: skip
    ray.shutdown()
    save()
    log(json.dumps({k: results.get(k) for k in ("scaling", "loss_agreement", "errors")}, indent=1))
    return 0 if not results.get("errors") else 1


if __name__ == "__main__":
    sys.exit(main())
