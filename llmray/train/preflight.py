"""Checks a training command runs before it writes anything or starts Ray.

Every function raises ``ValueError``/``FileNotFoundError``/``FileExistsError`` with a message naming the
flag or file (the CLI prints it as ``error: ...``, exit 2), and returns notes to print (``reusing X``,
``warning: ...``). Nothing here imports Ray or writes to disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, overload

from llmray.config import ModelConfig

MIN_BPE_VOCAB = 259  # 256 bytes + the 3 special tokens


@overload
def resolve_path(value: str) -> str: ...
@overload
def resolve_path(value: None) -> None: ...
def resolve_path(value: str | None) -> str | None:
    """A local path made absolute against the caller's working directory (``~`` expanded); URIs unchanged.

    Ray workers run in another directory: a relative path reaching them names another file.
    """
    if value is None or value == "" or "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def resolve_paths_list(value: str) -> str:
    """``resolve_path`` for each entry of a comma-separated list (globs stay globs)."""
    return ",".join(resolve_path(v.strip()) or "" for v in value.split(",") if v.strip())


def local_ray_starts() -> bool:
    """True when ``ray.init()`` would start an embedded Ray here (no RAY_ADDRESS, no running local Ray)."""
    if os.environ.get("RAY_ADDRESS"):
        return False
    try:  # the address of the last `ray start` on this machine, which ray.init() joins (None: start one)
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is None  # type: ignore[arg-type]  # ray annotates str, documents None
    except Exception:  # a Ray without this helper: assume embedded
        return True


def check_gpus(use_gpu: bool, num_workers: int) -> None:
    """``--use-gpu`` on an embedded local Ray needs one visible GPU per worker (else Ray waits for good).

    On a cluster (RAY_ADDRESS or a running ``ray start``) an autoscaler may add GPU nodes: no check here.
    """
    if not use_gpu or not local_ray_starts():
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < num_workers:
        raise ValueError(
            f"--use-gpu needs {num_workers} GPU(s) (one per --num-workers) but this machine has {have} "
            "visible to torch; drop --use-gpu to train on CPU, or set RAY_ADDRESS to a cluster with GPU nodes"
        )


def warmup_warning(max_steps: int | None, warmup_steps: int | None) -> list[str]:
    if max_steps is not None and warmup_steps is not None and max_steps < warmup_steps:
        return [
            f"warning: --max-steps {max_steps} is shorter than --warmup-steps {warmup_steps}: the learning rate "
            f"never reaches its peak (it stops at {max_steps / warmup_steps:.0%}); lower --warmup-steps"
        ]
    return []


def _tokenizer_kind(tok_file: Path) -> tuple[str, int]:
    """("char" | "bpe" | model type, vocabulary size with added tokens) of a saved tokenizer.json."""
    from llmray.model.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_file.parent)
    model_type = json.loads(tok_file.read_text())["model"].get("type", "?")
    kind = "char" if tok.is_char_level else ("bpe" if model_type == "BPE" else model_type)
    return kind, tok.vocab_size


def _check_saved_tokenizer(cfg: Any, out: Path) -> list[str]:
    """An earlier run's tokenizer in ``--out``: reuse it when it is the one asked for, else refuse."""
    saved = out / "tokenizer.json"
    if not saved.exists():
        return []
    kind, vocab = _tokenizer_kind(saved)
    if cfg.tokenizer in ("char", "bpe"):
        wanted = cfg.tokenizer
        same = kind == wanted and (wanted == "char" or vocab <= cfg.bpe_vocab)
        asked = "--tokenizer char" if wanted == "char" else f"--tokenizer bpe --bpe-vocab {cfg.bpe_vocab}"
    else:
        other = Path(cfg.tokenizer) / "tokenizer.json"
        same = other.read_text() == saved.read_text()
        asked = f"--tokenizer {cfg.tokenizer}"
    if not same:
        raise FileExistsError(
            f"--out {out} holds a {kind} tokenizer of {vocab} tokens from an earlier run, but {asked} was "
            f"asked; choose a new --out (or delete {saved} and that run's checkpoints to start over)"
        )
    return [f"reusing {saved} from an earlier run in --out ({kind}, {vocab} tokens)"]


def _char_data_problem(tok: Any, paths: list[str], flag: str) -> None:
    """Refuse text a char vocabulary cannot encode, naming the file, the 1-based line and the characters."""
    from llmray.model.tokenizer import describe_chars

    for path in paths:
        if "://" in path:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                unknown = tok.unknown_chars(line)
                if unknown:
                    raise ValueError(
                        f"{path}:{n}: {flag} holds characters the char tokenizer cannot encode: "
                        f"{describe_chars(unknown)} (a char vocabulary holds printable ASCII and the "
                        "characters of the corpus it was built from; use a BPE tokenizer for other text)"
                    )


def check_pretrain(cfg: Any) -> list[str]:
    """Validate a ``PretrainConfig`` (paths already absolute) before anything is written; returns notes."""
    from llmray.train import data as train_data

    ModelConfig.preset(cfg.preset)  # unknown preset: ValueError naming the choices
    paths = train_data.resolve_paths(cfg.data)
    for p in paths:
        train_data.file_format(p)
    notes: list[str] = []
    if cfg.tokenizer == "bpe" and cfg.bpe_vocab < MIN_BPE_VOCAB:
        raise ValueError(f"--bpe-vocab must be >= {MIN_BPE_VOCAB} for byte-level BPE, got {cfg.bpe_vocab}")
    if cfg.tokenizer not in ("char", "bpe"):
        if not (Path(cfg.tokenizer) / "tokenizer.json").exists():
            raise FileNotFoundError(
                f"--tokenizer {cfg.tokenizer}: no tokenizer.json there (use char, bpe or such a directory)"
            )
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    notes += _check_saved_tokenizer(cfg, out)
    tok_dir = out if (out / "tokenizer.json").exists() else None
    if tok_dir is None and cfg.tokenizer not in ("char", "bpe"):
        tok_dir = Path(cfg.tokenizer)
    if tok_dir is not None and all(train_data.file_format(p) == "text" for p in paths):
        from llmray.model.tokenizer import Tokenizer

        tok = Tokenizer.load(tok_dir)
        if tok.is_char_level:
            _char_data_problem(tok, paths, "--data")
    run_dir = Path(cfg.storage_path or out / "ray_results") / cfg.name
    checkpoints = (
        sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()) if "://" not in str(run_dir) else []
    )
    if checkpoints:
        _same_model_shape(cfg, checkpoints[-1] / "model.safetensors", run_dir)
        notes.append(f"resuming from the latest checkpoint in {run_dir} (an earlier run in --out)")
    check_gpus(cfg.use_gpu, cfg.num_workers)
    notes += warmup_warning(cfg.max_steps, cfg.warmup_steps)
    return notes


def check_finetune(cfg: Any) -> list[str]:
    """Validate a ``FinetuneConfig`` (paths already absolute) before anything is written; returns notes."""
    from llmray.model.checkpoint import load_config
    from llmray.model.tokenizer import Tokenizer

    load_config(cfg.base)  # a missing or foreign --base, named
    if not (Path(cfg.base) / "tokenizer.json").exists():
        raise FileNotFoundError(f"--base {cfg.base} has no tokenizer.json")
    for flag, path in (("--data", cfg.data), ("--val-data", cfg.val_data)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist")
    cfg.lora.target_modules()  # names no modules: ValueError
    tok = Tokenizer.load(cfg.base)
    if tok.is_char_level:
        for flag, path in (("--data", cfg.data), ("--val-data", cfg.val_data)):
            if path is not None:
                _chat_chars_problem(tok, path, flag)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    notes: list[str] = []
    # Ray Train's checkpoint_<time> directories (not its checkpoint_manager_snapshot.json): the last is newest
    checkpoints = sorted(p for p in (out / "ray" / "finetune").glob("checkpoint_*") if p.is_dir())
    if checkpoints:
        _same_adapter_shape(cfg, checkpoints[-1] / "adapter" / "adapter_config.json", out)
        notes.append(f"resuming from the latest checkpoint in {out / 'ray' / 'finetune'} (an earlier run)")
    check_gpus(cfg.use_gpu, cfg.num_workers)
    notes += warmup_warning(cfg.max_steps, cfg.warmup_steps)
    return notes


def _same_model_shape(cfg: Any, weights: Path, run_dir: Path) -> None:
    """An earlier run's checkpoint resumes only a model of the same width and depth (another preset failed in
    the Ray Train worker: "size mismatch for model.norm.weight")."""
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            names = list(f.keys())
            hidden = f.get_slice("model.norm.weight").get_shape()[0]
    except Exception:  # unreadable or another layout: the worker's own load names the problem
        return
    layers = len({n.split(".")[2] for n in names if n.startswith("model.layers.")})
    want = ModelConfig.preset(cfg.preset)
    if layers and (hidden, layers) != (want.hidden_size, want.num_hidden_layers):
        raise ValueError(
            f"{run_dir} holds checkpoints of another model ({layers} layers x {hidden}), which cannot resume "
            f"--preset {cfg.preset} ({want.num_hidden_layers} layers x {want.hidden_size}): choose another --out "
            "(or --storage-path), or rerun with that run's --preset"
        )


def _same_adapter_shape(cfg: Any, adapter_config: Path, out: Path) -> None:
    """An earlier run's checkpoint in ``--out`` resumes only a run of the same LoRA shape (another rank or
    target set failed in the worker with an IndexError while loading the optimizer state)."""
    try:
        old = json.loads(adapter_config.read_text())
    except (OSError, ValueError):
        return
    have_r, have_t = old.get("r"), sorted(old.get("target_modules") or [])
    want_r, want_t = cfg.lora.r, sorted(cfg.lora.target_modules())
    if (have_r, have_t) != (want_r, want_t):
        raise ValueError(
            f"--out {out} holds checkpoints of another adapter (rank {have_r} on {','.join(have_t)}), which "
            f"cannot resume this run (--lora-r {want_r} on {','.join(want_t)}): choose another --out, or "
            "rerun with that adapter's --lora-r/--lora-targets"
        )


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _chat_chars_problem(tok: Any, path: str, flag: str) -> None:
    """Chat JSONL: the text of every line must encode (bad JSON is left to the data loader's report)."""
    from llmray.model.tokenizer import describe_chars

    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                text = "".join(_strings(json.loads(line)))
            except ValueError:
                continue
            unknown = tok.unknown_chars(text)
            if unknown:
                raise ValueError(
                    f"{path}:{n}: {flag} holds characters the char tokenizer of --base cannot encode: "
                    f"{describe_chars(unknown)} (a char vocabulary holds printable ASCII and the characters of "
                    "its pretraining corpus; they are refused rather than replaced)"
                )


def check_merge(base: str, lora: str, out: str) -> None:
    from llmray.model.checkpoint import load_config

    load_config(base)
    if not (Path(lora) / "adapter_config.json").exists():
        raise FileNotFoundError(f"--lora {lora}: no adapter_config.json there (a PEFT adapter directory)")
    o = Path(out)
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not empty; merge writes a new checkpoint directory")
