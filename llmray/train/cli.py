"""``llmray pretrain``, ``llmray finetune``, ``llmray merge``: flags generated from the config dataclasses.

Every field of ``PretrainConfig`` / ``FinetuneConfig`` is a flag (``llmray.train.flags``), its default in
``--help``. Before anything is written or Ray starts, paths are made absolute against the caller's working
directory (Ray workers run elsewhere) and ``llmray.train.preflight`` checks every flag.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmray.config import PRESETS
from llmray.train import preflight
from llmray.train.finetune import FinetuneConfig
from llmray.train.flags import add_dataclass_flags, build_dataclass
from llmray.train.fsdp import PARALLEL_MODES
from llmray.train.pretrain import PretrainConfig

KERNELS = ("auto", "triton", "torch")
PRECISIONS = ("auto", "bf16", "fp32")  # fields a config may not have yet are simply not flags
USE_GPU = "one GPU per Ray Train worker"
TEST_HOOKS = ("fail_at_step", "fail_kill")

PRETRAIN_HELP = {
    "data": "text/JSONL/parquet file(s): path, dir, glob or s3:// URI (comma-separated for several)",
    "out": "output dir: HF model, metrics.jsonl, loss_curve.png, ray.log, checkpoints",
    "preset": "model shape",
    "tokenizer": "char | bpe (trained on the corpus) | DIR with tokenizer.json",
    "bpe_vocab": "BPE vocabulary size (with --tokenizer bpe)",
    "text_field": "JSONL/parquet field holding the text",
    "val_fraction": "share of the token stream held out for validation",
    "max_steps": "optimizer steps",
    "num_workers": "Ray Train workers (data-parallel)",
    "use_gpu": USE_GPU,
    "cpus_per_worker": "CPUs each worker reserves (fractional leaves room for Ray Data)",
    "optimizer": "muon (Muon + AdamW) | adamw",
    "parallel": "ddp (replicated weights) | fsdp (FSDP2: weights, grads, optimizer state sharded)",
    "seq_len": "tokens per training window",
    "batch_size": "sequences per optimizer step per worker",
    "grad_accum": "micro-batches per step (--batch-size is split into them)",
    "lr": "AdamW learning rate (embeddings, norms, head; everything with --optimizer adamw)",
    "muon_lr": "Muon learning rate (matrices)",
    "warmup_steps": "linear warm-up steps",
    "schedule": "learning-rate schedule after warm-up",
    "min_lr_ratio": "final learning rate / peak",
    "eval_every": "steps between validations",
    "eval_windows": "validation windows per evaluation",
    "checkpoint_every": "steps between checkpoints",
    "log_every": "steps between metrics.jsonl records",
    "print_every": "steps between console progress lines; the first, the last and validations always print",
    "compile": "torch.compile the model",
    "cuda_graphs": "replay forward+backward from CUDA graphs (one GPU worker, no --compile)",
    "compile_ahead": "Triton kernels: compile the first step's kernels ahead, on threads, before it",
    "kernels": "auto (Triton on CUDA) | triton | torch",
    "precision": "auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp32",
    "weight_decay": "decoupled weight decay",
    "grad_clip": "gradient-norm clipping",
    "seed": "model init and data order",
    "name": "Ray Train run name",
    "storage_path": "Ray Train storage (s3:// on clusters)",
    "max_failures": "worker-group restarts from the last checkpoint",
    "target_val_loss": "stop once validation loss reaches it",
}
PRETRAIN_NONE = {"storage_path": "OUT/ray_results", "target_val_loss": "off", "print_every": "max-steps / 20"}

FINETUNE_HELP = {
    "base": "base checkpoint directory (Hugging Face Qwen3 format)",
    "data": 'JSONL: {"messages": [...]} or {"prompt", "completion"} lines',
    "out": "output directory: PEFT adapter, metrics.jsonl, ray.log, Ray run state",
    "val_data": "held-out JSONL",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha (scale alpha/r)",
    "lora_dropout": "LoRA dropout",
    "lora_targets": "attn (q,v) | all-attn | all-linear | q_proj,v_proj,...",
    "lora_qlora": "NF4 base weights (bitsandbytes), LoRA on top",
    "max_steps": "optimizer steps",
    "num_workers": "Ray Train workers (data-parallel)",
    "use_gpu": USE_GPU,
    "lr": "AdamW learning rate",
    "warmup_steps": "linear warm-up steps",
    "batch_size": "sequences per worker per step",
    "seq_len": "longer examples are truncated",
    "val_fraction": "share of --data held out when --val-data is not given",
    "checkpoint_every": "steps between checkpoints",
    "print_every": "steps between console progress lines; the first, the last and validations always print",
    "gradient_checkpointing": "recompute activations in backward",
    "compute_dtype": "QLoRA compute dtype: auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32",
    "kernels": "auto (Triton on CUDA) | triton | torch",
    "precision": "auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp32",
    "lora_impl": "ours (llmray's LoRA training layers) | peft (the fallback)",
    "cuda_graphs": "replay forward+backward from CUDA graphs (not with QLoRA / gradient checkpointing)",
    "grad_clip": "gradient-norm clipping",
    "weight_decay": "AdamW weight decay",
    "seed": "held-out split, batch order, adapter init",
    "max_failures": "worker-group restarts from the last checkpoint",
}
FINETUNE_NONE = {
    "val_data": "10% of --data held out",
    "max_steps": "one epoch",
    "warmup_steps": "5% of the steps",
    "gradient_checkpointing": "on for QLoRA",
    "print_every": "the run's steps / 20",
}


def _flag_spec(cls: type) -> dict[str, Any]:
    """How ``add_dataclass_flags`` turns ``cls``'s fields into flags (choices read when the parser is built)."""
    if cls is PretrainConfig:
        choices = {
            "preset": tuple(PRESETS),
            "optimizer": ("muon", "adamw"),
            "schedule": ("cosine", "wsd", "constant"),
            "parallel": tuple(PARALLEL_MODES),
        }
        return {"helps": PRETRAIN_HELP, "choices": choices, "required": ("data", "out"), "hidden": TEST_HOOKS,
                "none_means": PRETRAIN_NONE}  # fmt: skip
    return {"helps": FINETUNE_HELP, "choices": {"lora_impl": ("ours", "peft")}, "required": ("base", "data", "out"),
            "none_means": FINETUNE_NONE, "rename": {"lora_qlora": "qlora"}}  # fmt: skip


def add_config_arguments(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``PretrainConfig`` or ``FinetuneConfig``."""
    spec = _flag_spec(cls)
    spec["choices"] |= {"kernels": KERNELS, "precision": PRECISIONS}
    add_dataclass_flags(p, cls, **spec)


# subcommand -> (config class, one-line help, description); the command functions are below
TRAIN_COMMANDS = {
    "pretrain": (
        PretrainConfig,
        "pretrain a Qwen3-architecture model on Ray Train (Muon)",
        "Pretrain on Ray Train; every flag is a PretrainConfig field.",
    ),
    "finetune": (
        FinetuneConfig,
        "LoRA/QLoRA fine-tuning on chat JSONL under Ray Train",
        "LoRA/QLoRA fine-tuning on Ray Train; every flag is a FinetuneConfig field.",
    ),
}


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``llmray pretrain``, ``llmray finetune`` and ``llmray merge``."""
    funcs = {"pretrain": pretrain_command, "finetune": finetune_command}
    for name, (cls, help_line, description) in TRAIN_COMMANDS.items():
        p = subparsers.add_parser(name, help=help_line, description=description)
        add_config_arguments(p, cls)
        p.set_defaults(func=funcs[name], config_class=cls)

    m = subparsers.add_parser("merge", help="merge a LoRA adapter into its base (full-precision merge)")
    m.add_argument("--base", required=True, help="base checkpoint directory (required)")
    m.add_argument("--lora", required=True, help="PEFT adapter directory (required)")
    m.add_argument("--out", required=True, help="new checkpoint directory (required)")
    m.add_argument(
        "--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"), help="(default: bfloat16)"
    )
    m.set_defaults(func=merge_command)


# --- flags -> config --------------------------------------------------------------------------------------
def _resolved(values: dict[str, Any], cls: type) -> dict[str, Any]:
    """Path flags made absolute against the caller's working directory (URIs and globs kept as such)."""
    v = dict(values)
    if cls is PretrainConfig:
        v["data"] = preflight.resolve_paths_list(v["data"])
        for key in ("out", "storage_path"):
            v[key] = preflight.resolve_path(v.get(key))
        if v.get("tokenizer") not in (None, "char", "bpe"):
            v["tokenizer"] = preflight.resolve_path(v["tokenizer"])
    else:
        for key in ("base", "data", "val_data", "out"):
            v[key] = preflight.resolve_path(v.get(key))
    return v


def config_from_args(args: argparse.Namespace) -> PretrainConfig | FinetuneConfig:
    """The config of a parsed ``pretrain``/``finetune`` command line, with absolute paths."""
    cls = getattr(args, "config_class", PretrainConfig)
    return build_dataclass(cls, _resolved(vars(args), cls))


# --- commands ---------------------------------------------------------------------------------------------
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def usage_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input -> ``error: <message>`` on stderr and exit code 2 (the traceback with LLMRAY_DEBUG=1)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except USAGE_ERRORS as e:
            if os.environ.get("LLMRAY_DEBUG", "") not in ("", "0"):
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2

    return run


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(note, flush=True)


@usage_errors
def pretrain_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    assert isinstance(cfg, PretrainConfig), "the pretrain subcommand's config_class is PretrainConfig"
    _print_notes(preflight.check_pretrain(cfg))
    from llmray.train.pretrain import run_pretrain

    print(f"pretraining {cfg.preset} on {cfg.data} for {cfg.max_steps} steps -> {cfg.out}", flush=True)
    result = run_pretrain(cfg)
    last = result["last"]
    print(
        f"done: step {last.get('step')} loss {last.get('loss', float('nan')):.4f} "
        f"val_loss {last.get('val_loss', float('nan')):.4f}\n"
        f"model (Hugging Face Qwen3 + tokenizer): {result['out']}\n"
        f"metrics: {result['metrics_file']}\nloss curve: {result['loss_curve']}\n"
        f"last checkpoint: {result['checkpoint']}"
    )
    return 0


@usage_errors
def finetune_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    assert isinstance(cfg, FinetuneConfig), "the finetune subcommand's config_class is FinetuneConfig"
    _print_notes(preflight.check_finetune(cfg))
    from llmray.train.finetune import run_finetune

    run_finetune(cfg)
    return 0


@usage_errors
def merge_command(args: argparse.Namespace) -> int:
    import torch

    from llmray.train import peft_adapters

    base, adapter, out = (preflight.resolve_path(x) for x in (args.base, args.lora, args.out))
    preflight.check_merge(base, adapter, out)
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    written = peft_adapters.merge_adapter(base, adapter, out, dtype=dtypes[args.dtype])
    print(f"merged {adapter} into {base}: {args.dtype} checkpoint written to {Path(written)}")
    return 0
