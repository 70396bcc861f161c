"""Pretraining benchmarks on one GPU; writes train.json (the issue's keys) and train_details.json to --out.

(c) ``qwen3-0.6b`` at 8 x 2048 in bf16 under Ray Train (a TorchTrainer with one GPU worker running
    every variant in one process): tokens/s and MFU of the harness's training step (the median of 10
    CUDA-event-timed steps, ``llmray.train.throughput.measure``) with our Triton kernels
    (eager, and with each decoder block compiled) against torch.compile only (blocks and loss compiled);
    ``mfu_triton`` is the best Triton variant's MFU.
(e) TinyShakespeare char-level (``shakespeare-char``) through ``run_pretrain`` on Ray Train: seconds of
    training to val loss <= 1.47 (``shakespeare_char_s``; the worker's clock from its first step, compile
    and evaluations included; Ray start-up, Ray Data tokenization and export reported separately).
(a)/(b)/(d) (in-process ``train_steps`` with a ``LocalSession``): the earlier speed run, Muon vs AdamW and
    seed-7m on BPE; not in the default ``--parts``.

    python bench/train.py [--data .data/tinyshakespeare/input.txt] [--parts ce] [--out DIR]
    python bench/train.py --smoke --parts ce --out /tmp/bt     # CPU plumbing check, no numbers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmray.config import ModelConfig  # noqa: E402
from llmray.train import data as D  # noqa: E402
from llmray.train.data import prepare_corpus  # noqa: E402
from llmray.train.loop import flops_per_token, plot_loss_curve, read_metrics  # noqa: E402
from llmray.train.pretrain import PretrainConfig, train_steps  # noqa: E402
from llmray.train.session import LocalSession  # noqa: E402
from llmray.train.throughput import throughput_worker  # noqa: E402

T0 = time.perf_counter()
DEVICE = "cuda"
KEEP = ROOT / "bench" / "results" / "train.json"  # values of parts not re-run are kept from here
SMOKE: dict = {}  # --smoke (CPU): tiny overrides so the script's plumbing can be checked without a GPU


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def train_run(cfg: PretrainConfig, mc: ModelConfig, train, val) -> dict:
    """One in-process run; returns its metrics records and wall time (clock from the first step)."""
    cfg = dataclasses.replace(cfg, **SMOKE.get("train", {}))
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    batches = D.local_batches(train, cfg.seq_len, cfg.seed, cfg.micro_batch_size, device=DEVICE)
    t = time.perf_counter()
    train_steps(cfg, mc, batches, val, LocalSession(DEVICE))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    return {"records": read_metrics(Path(cfg.out) / "metrics.jsonl"), "wall_s": wall}


def first_reaching(records: list[dict], target: float) -> dict | None:
    return next((r for r in records if r.get("val_loss", 9e9) <= target), None)


def part_a_b(args, results: dict, out: Path) -> None:
    base = PretrainConfig(
        data=args.data, out=str(out / "char"), preset="shakespeare-char", tokenizer="char", seq_len=256,
        batch_size=64, max_steps=2000, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1, lr=3e-3,
        muon_lr=0.03, eval_every=50, eval_windows=512, log_every=50, checkpoint_every=10**9, compile=True,
        kernels="torch", weight_decay=0.0,
    )  # fmt: skip
    t = time.perf_counter()
    tok, mc, train, val = prepare_corpus(base)
    results["char_data_prep_s"] = time.perf_counter() - t
    log(f"char corpus: {len(train)} train / {len(val)} val tokens, vocab {tok.vocab_size}")
    # (a) speed run: Muon, stop at 1.47
    cfg = dataclasses.replace(base, out=str(out / "a_muon"), target_val_loss=1.47)
    run = train_run(cfg, mc, train, val)
    hit = first_reaching(run["records"], 1.47)
    best = min(r["val_loss"] for r in run["records"] if "val_loss" in r)
    results["a_shakespeare_char"] = {
        "target_val_loss": 1.47,
        "reached": hit is not None,
        "wall_s_to_target_incl_compile": hit["elapsed_s"] if hit else None,
        "step_at_target": hit["step"] if hit else None,
        "best_val_loss": best,
        "run_wall_s": run["wall_s"],
        "params": mc.num_params(),
        "config": {
            k: getattr(cfg, k)
            for k in ("seq_len", "batch_size", "max_steps", "lr", "muon_lr", "warmup_steps")
        },
        "path": "in-process train_steps (the Ray worker loop) with local_batches; data via Ray Data",
        "nanogpt_reference": "val 1.4697 in ~3 min on one A100 (dropout 0.2; our Qwen3 has no dropout)",
    }
    log(f"(a) {results['a_shakespeare_char']}")
    write(results, out)
    # (b) Muon vs AdamW, steps to 1.55
    curves, sweep = {}, []
    runs = [
        ("muon", 0.015),
        ("muon", 0.03),
        ("muon", 0.06),
        ("adamw", 1e-3),
        ("adamw", 2e-3),
        ("adamw", 4e-3),
    ]
    for opt, lr in runs:
        if time.perf_counter() - T0 > args.budget_s * 0.55:
            log(f"(b) skipping {opt} lr={lr}: time guard")
            continue
        kw = {"muon_lr": lr} if opt == "muon" else {"lr": lr}
        cfg = dataclasses.replace(
            base, out=str(out / f"b_{opt}_{lr}"), optimizer=opt, target_val_loss=1.55, **kw
        )
        if opt == "muon" and lr == 0.03 and hit is not None:
            records = [
                r for r in run["records"] if r["step"] <= hit["step"]
            ]  # (a) is this run to 1.55 and on
        else:
            records = train_run(cfg, mc, train, val)["records"]
        h = first_reaching(records, 1.55)
        sweep.append({"optimizer": opt, "lr": lr, "steps_to_1.55": h["step"] if h else None,
                      "wall_s_to_1.55": h["elapsed_s"] if h else None,
                      "best_val_loss": min(r["val_loss"] for r in records if "val_loss" in r)})  # fmt: skip
        curves[f"{opt} lr={lr}"] = records
        log(f"(b) {sweep[-1]}")
    best = {}
    for opt in ("muon", "adamw"):
        ok = [s for s in sweep if s["optimizer"] == opt and s["steps_to_1.55"]]
        best[opt] = min(ok, key=lambda s: s["steps_to_1.55"]) if ok else None
    ratio = (
        best["muon"]["steps_to_1.55"] / best["adamw"]["steps_to_1.55"]
        if best["muon"] and best["adamw"]
        else None
    )
    results["b_muon_vs_adamw"] = {
        "sweep": sweep,
        "best": best,
        "muon_over_adamw_steps": ratio,
        "target": 0.75,
    }
    plot_loss_curve(curves, out / "train_muon_vs_adamw.png", title="shakespeare-char: Muon vs AdamW (val)")
    plot_loss_curve(
        {"muon (a)": run["records"]}, out / "train_shakespeare_char.png", title="(a) shakespeare-char"
    )
    write(results, out)


def part_c(args, results: dict, out: Path) -> None:
    """qwen3-0.6b, 8 x 2048, bf16 under Ray Train (one GPU worker): our kernels vs torch.compile only."""
    from llmray.train.session import run_trainer

    mc = ModelConfig.preset(SMOKE.get("c_preset", "qwen3-0.6b"))
    seq, bsz = SMOKE.get("c_shape", (2048, 8))
    out_file = out / "c_throughput.json"
    r = run_trainer(
        throughput_worker, {"preset": SMOKE.get("c_preset", "qwen3-0.6b"), "bsz": bsz, "seq": seq,
                             "out_file": str(out_file),
                             "variants": [tuple(v.split(":")) for v in args.c_variants.split(",")]},
        num_workers=1, use_gpu=DEVICE == "cuda", cpus_per_worker=1.0, name="bench_c",
        storage_path=str(out / "ray_c"), max_failures=0,
    )  # fmt: skip
    res = json.loads(out_file.read_text()) if out_file.exists() else {"error": str(r.error)}
    res.update(seq_len=seq, batch=bsz, flops_per_token=flops_per_token(mc, seq), peak_flops=989e12,
               path="Ray Train TorchTrainer, 1 GPU worker; llmray.train.harness.train_step")  # fmt: skip
    base = res.get("torch+compile_blocks")
    best = max((v for k, v in res.items() if k.startswith("triton") and isinstance(v, dict)),
               key=lambda v: v["tokens_per_s"], default=None)  # fmt: skip
    if best is not None:
        results["mfu_triton"] = round(best["mfu"], 4)
        if isinstance(base, dict):
            res["triton_best_over_torch_compile"] = round(best["tokens_per_s"] / base["tokens_per_s"], 3)
            results["compile_only_tok_s"] = round(base["tokens_per_s"])
            results["triton_tok_s"] = round(best["tokens_per_s"])
            results["triton_over_compile"] = res["triton_best_over_torch_compile"]
    results["c_qwen3_0.6b_throughput"] = res
    write(results, out)


def part_d(args, results: dict, out: Path) -> None:
    cfg = PretrainConfig(
        data=args.data, out=str(out / "d_seed7m"), preset="seed-7m", tokenizer="bpe", bpe_vocab=8192, seq_len=256,
        batch_size=64, max_steps=600, warmup_steps=50, lr=3e-3, muon_lr=0.02, eval_every=25, eval_windows=512,
        log_every=25, checkpoint_every=10**9, compile=True, kernels="torch",
    )  # fmt: skip
    t = time.perf_counter()
    tok, mc, train, val = prepare_corpus(cfg)
    prep = time.perf_counter() - t
    log(
        f"(d) BPE corpus: {len(train)} train / {len(val)} val tokens, vocab {tok.vocab_size}, prep {prep:.1f}s"
    )
    run = train_run(cfg, mc, train, val)
    evals = [r for r in run["records"] if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    results["d_seed_7m_bpe"] = {
        "corpus": "TinyShakespeare, byte-level BPE 8192 trained on it (90/10 split)",
        "params": mc.num_params(),
        "best_val_loss": best["val_loss"],
        "val_accuracy_at_best": best["val_accuracy"],
        "step_at_best": best["step"],
        "wall_s_to_best": best["elapsed_s"],
        "final": evals[-1],
        "bpe_and_tokenize_s": prep,
        "blog": {"loss": 4.49, "accuracy": 0.3185, "wall_min": 20.3},
        "note": "different corpus than the blog's; TinyShakespeare is ~0.3M BPE tokens and overfits quickly",
    }
    plot_loss_curve(
        {"seed-7m": run["records"]}, out / "train_seed7m_bpe.png", title="(d) seed-7m, BPE Shakespeare"
    )
    log(f"(d) {results['d_seed_7m_bpe']}")
    write(results, out)


def part_e(args, results: dict, out: Path) -> None:
    """(a) through Ray Train (TorchTrainer, 1 GPU worker, Ray Data shard): the production path's overhead."""
    from llmray.train.pretrain import run_pretrain

    cfg = PretrainConfig(
        data=args.data, out=str(out / "e_ray"), preset="shakespeare-char", tokenizer="char", seq_len=256,
        batch_size=64, max_steps=2000, warmup_steps=100, lr=3e-3, muon_lr=0.03, eval_every=50, eval_windows=512,
        log_every=50, checkpoint_every=10**6, compile=args.e_compile, kernels=args.e_kernels, use_gpu=True,
        num_workers=1, cpus_per_worker=1.0, target_val_loss=1.47, cuda_graphs=not args.e_no_graphs,
        compile_ahead=not args.no_compile_ahead,
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, **SMOKE.get("train", {}))
    if SMOKE:
        # the tiny preset: Muon's bf16 Newton-Schulz on a CPU without bf16 units is most of a step
        cfg = dataclasses.replace(cfg, use_gpu=False, checkpoint_every=6, preset="tiny")
    t = time.perf_counter()
    r = run_pretrain(cfg)
    wall = time.perf_counter() - t
    records = read_metrics(r["metrics_file"])
    hit = first_reaching(records, 1.47)
    train_s = hit["elapsed_s"] if hit else None
    results["shakespeare_char_s"] = round(train_s, 2) if train_s is not None else None
    results["e_ray_train"] = {
        "kernels": cfg.kernels, "compile": cfg.compile, "cuda_graphs": cfg.cuda_graphs,
        "train_s_to_1.47_incl_compile_and_evals": train_s,
        "step_at_1.47": hit["step"] if hit else None,
        "best_val_loss": min((x["val_loss"] for x in records if "val_loss" in x), default=None),
        "wall_s_total": wall,
        "ray_startup_data_and_export_s": wall - (records[-1]["elapsed_s"] if records else 0.0),
        "last": r["last"],
        "warmup": _read_json(Path(cfg.out) / "warmup.json"),
        "clock": "from the worker's first training step (after model build): Ray start, Ray Data "
        "tokenization and the TorchTrainer start are in ray_startup_data_and_export_s",
    }  # fmt: skip
    log(f"(e) {results['e_ray_train']}")
    write(results, out)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def local_char_corpus(cfg: PretrainConfig):
    """The char corpus without Ray Data (part s): the same vocabulary (every character of the text) and split."""
    from llmray.model.tokenizer import char_tokenizer

    text = Path(cfg.data).read_text()
    tok = char_tokenizer(text)
    train, val = D.split_tokens(np.asarray(tok.encode(text), dtype=np.int32), cfg.val_fraction)
    mc = ModelConfig.preset(cfg.preset).replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                                                bos_token_id=None)  # fmt: skip
    return mc, train, val


def part_s(args, results: dict, out: Path) -> None:
    """Shakespeare-char in this process (``train_steps`` + ``LocalSession``, no Ray) for each of --s-kernels:
    the Triton compiles and first steps apart from the rest (warmup.json); writes no target key."""
    if args.ns_sym_min_size is not None:
        import llmray.train.muon as muon

        muon.NS_SYM_MIN_SIZE = args.ns_sym_min_size
    for kernels in args.s_kernels.split(","):
        cfg = PretrainConfig(
            data=args.data, out=str(out / f"s_{kernels}"), preset="shakespeare-char", tokenizer="char",
            seq_len=256, batch_size=64, max_steps=2000, warmup_steps=100, lr=3e-3, muon_lr=0.03, eval_every=50,
            eval_windows=512, log_every=50, checkpoint_every=10**6, compile=args.e_compile, kernels=kernels,
            target_val_loss=1.47, cuda_graphs=not args.e_no_graphs, compile_ahead=not args.no_compile_ahead,
        )  # fmt: skip
        if SMOKE:
            cfg = dataclasses.replace(cfg, preset="tiny", kernels="torch")  # see part_e
        t = time.perf_counter()
        mc, train, val = local_char_corpus(cfg)
        prep = time.perf_counter() - t
        run = train_run(cfg, mc, train, val)
        hit = first_reaching(run["records"], 1.47)
        results[f"s_inprocess_{kernels}"] = {
            "kernels": cfg.kernels, "cuda_graphs": cfg.cuda_graphs, "corpus_prep_s": prep,
            "train_s_to_1.47": hit["elapsed_s"] if hit else None, "step_at_1.47": hit["step"] if hit else None,
            "evals": [(r["step"], round(r["elapsed_s"], 2), round(r["val_loss"], 4)) for r in run["records"]
                      if "val_loss" in r],
            "warmup": _read_json(Path(cfg.out) / "warmup.json"),
        }  # fmt: skip
        log(f"(s) {results[f's_inprocess_{kernels}']}")
        write(results, out)


def write(results: dict, out: Path) -> None:
    results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results["torch"] = torch.__version__
    results["script_wall_s"] = time.perf_counter() - T0
    keys = ("device", "mfu_triton", "shakespeare_char_s")  # the keys; details beside them
    extra = ("compile_only_tok_s", "triton_tok_s", "triton_over_compile")
    kept = (
        json.loads(KEEP.read_text()) if KEEP.exists() else {}
    )  # a key this run did not measure: the last value
    row = {k: results[k] if results.get(k) is not None else kept.get(k) for k in keys + extra}
    results["kept_from_earlier_run"] = [k for k in keys + extra if results.get(k) is None and k in kept]
    (out / "train_details.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "train.json").write_text(json.dumps(row, indent=1))


def smoke_cpu_variants(args) -> None:
    """--smoke on CPU: no CUDA graphs; Triton kernels only under the interpreter (TRITON_INTERPRET=1)."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    variants = []
    for v in args.c_variants.split(","):
        kernels, mode = v.split(":")
        if kernels != "torch" and not interp:
            continue
        variants.append(f"{kernels}:none")  # no torch.compile (minutes on a loaded CPU), no CUDA graphs
    args.c_variants = ",".join(dict.fromkeys(variants)) or "torch:none"
    args.e_no_graphs = True
    if args.e_kernels != "torch" and not interp:
        args.e_kernels = "torch"
    if not interp:
        log("--smoke on CPU: Triton variants run as kernels=torch (Triton on CPU needs TRITON_INTERPRET=1, "
            "which runs them in the slow interpreter); no compile, no CUDA graphs")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT / ".data" / "tinyshakespeare" / "input.txt"))
    p.add_argument("--parts", default="ce")
    p.add_argument(
        "--c-variants",
        default="torch:blocks,triton:graphs,triton:none",
        help="(c) kernels:mode pairs (mode: blocks = compile each block, graphs = CUDA graphs, none)",
    )
    p.add_argument("--e-kernels", default="triton", help="(e) kernels: auto | triton | torch")
    p.add_argument("--s-kernels", default="torch,triton", help="(s) in-process runs, one per kernels value")
    p.add_argument("--no-compile-ahead", action="store_true", help="(e, s) first-use compiles, one at a time")
    p.add_argument("--ns-sym-min-size", type=int, default=None, help="(s) muon.NS_SYM_MIN_SIZE for this run")
    p.add_argument("--e-compile", action="store_true", help="(e) torch.compile (off: our kernels need none)")
    p.add_argument("--e-no-graphs", action="store_true", help="(e) eager steps instead of CUDA graphs")
    p.add_argument("--budget-s", type=float, default=280.0)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny steps, no numbers")
    args = p.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
        SMOKE.update(train=dict(max_steps=12, eval_every=6, eval_windows=8, log_every=3, compile=False,
                                batch_size=4, seq_len=64), c_preset="tiny", c_shape=(64, 2))  # fmt: skip
        smoke_cpu_variants(args)
    elif not torch.cuda.is_available():
        print("bench/train.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    if set(args.parts) != {"s"}:  # part s alone runs without Ray
        import ray

        ray.init(num_cpus=max(8, os.cpu_count() or 8), include_dashboard=False, log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(sys.argv)}
    parts = {"a": part_a_b, "d": part_d, "c": part_c, "e": part_e, "s": part_s}
    order = [k for k in dict.fromkeys(args.parts.replace("b", "a")) if k in parts]  # in the order asked
    for key, fn in ((k, parts[k]) for k in order):
        if True:
            try:
                fn(args, results, out)
            except Exception as e:
                import traceback

                traceback.print_exc()
                results[f"{key}_error"] = f"{type(e).__name__}: {e}"
                write(results, out)
    write(results, out)
    log(json.dumps(results, indent=1, default=str)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
