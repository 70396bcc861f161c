"""Model directories in Hugging Face Qwen3 format: config.json + safetensors (+ tokenizer files).

What llmray writes, transformers/vLLM/SGLang load; what they publish (single or sharded safetensors,
bf16/fp16/fp32, tied head written or omitted), llmray loads. Never pickle: a directory holding only
``pytorch_model.bin`` is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmray.config import ModelConfig
from llmray.model.qwen3 import Qwen3ForCausalLM, rope_tables

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def hf_config_dict(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json contents with every field transformers' Qwen3Config needs."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **config.to_dict(),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "max_window_layers": config.num_hidden_layers,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
        "use_cache": True,
        "torch_dtype": DTYPE_NAMES[dtype],
        "transformers_version": "4.51.0",
    }


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model(
    model: Qwen3ForCausalLM,
    out_dir: str | Path,
    tokenizer: Any | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face Qwen3 directory; returns the path.

    Each file is written to a temporary name and renamed, so a crash never leaves a half-written file.
    A tied head is omitted (as transformers does).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[name] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    _atomic_write_text(out / "config.json", json.dumps(hf_config_dict(model.config, dtype), indent=2))
    gen = {"transformers_version": "4.51.0"}
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(model.config, key) is not None:
            gen[key] = getattr(model.config, key)
    _atomic_write_text(out / "generation_config.json", json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: not a Hugging Face model directory")
    raw = json.loads(cfg_file.read_text())
    if raw.get("model_type") != "qwen3":
        raise ValueError(
            f"{cfg_file} has model_type={raw.get('model_type')!r}; llmray loads Qwen3 models (model_type 'qwen3')"
        )
    return ModelConfig.from_dict(raw)


def checkpoint_dtype(model_dir: str | Path) -> torch.dtype:
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a directory: model.safetensors, or the shards named by the index."""
    path = Path(model_dir)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return [path / s for s in shards]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(
            f"{path} holds only pickle-based weights (.bin/.pt); llmray never unpickles. "
            "Convert them to safetensors (e.g. transformers save_pretrained(safe_serialization=True))."
        )
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def load_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    kernels: str = "auto",
) -> Qwen3ForCausalLM:
    """Load a Qwen3 directory. ``dtype=None`` keeps the checkpoint's dtype (config.json torch_dtype)."""
    config = load_config(model_dir)
    dtype = dtype or checkpoint_dtype(model_dir)
    state = load_state_dict(model_dir)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config, kernels=kernels)
    expected = model.state_dict()
    tied = config.tie_word_embeddings
    if tied:
        state.pop("lm_head.weight", None)  # written or omitted: the embedding is the head
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{model_dir}: tensors not in a Qwen3 model with this config: {unexpected[:8]}")
    missing = sorted(k for k in expected if k not in state and not (tied and k == "lm_head.weight"))
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks tensors {missing[:8]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{model_dir}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(expected[name].shape)}"
            )
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=False)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # rope tables are non-persistent buffers (left empty by to_empty): recompute them in fp32
    cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model.to(dtype).eval()
