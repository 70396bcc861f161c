"""Reading a PEFT LoRA adapter directory into per-module (A, B) matrices, with errors a user can act on.

Format (what ``llmray finetune`` and peft write): ``adapter_config.json`` + ``adapter_model.safetensors``
with keys ``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight``;
A is (r, in_features), B is (out_features, r); the delta is ``scaling · B @ A`` with scaling = alpha/r
(alpha/sqrt(r) with rsLoRA). Pickle files (``adapter_model.bin``) are refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llmray.config import ModelConfig
from llmray.lora.errors import AdapterError  # re-exported: callers catch it from here

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)


def module_shape(config: ModelConfig, module: str) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer of the base model."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }[module]


@dataclass
class LoraAdapter:
    name: str
    path: Path
    rank: int
    scaling: float
    version: int = 0  # set when registered: requests run on the version they were accepted with
    # (layer index, module name) -> (A (r, in), B (out, r)) on the CPU, in the adapter's dtype
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values()
        )


def load_adapter(name: str, path: str | Path, config: ModelConfig, max_rank: int) -> LoraAdapter:
    """Validate and read an adapter directory for a base model of shape ``config``."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: directory {path} does not exist")
    cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.exists():
        raise AdapterError(f"adapter {name!r}: {path} has no adapter_config.json (not a PEFT adapter)")
    if not weights_file.exists():
        pickled = (path / "adapter_model.bin").exists()
        why = (
            "only a pickle-based adapter_model.bin, which llmray never unpickles" if pickled else "no weights"
        )
        raise AdapterError(f"adapter {name!r}: {path} has {why}; expected adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type must be LORA, got {cfg.get('peft_type')!r}")
    for flag in ("use_dora",):
        if cfg.get(flag):
            raise AdapterError(f"adapter {name!r}: {flag}=true is not supported for serving")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise AdapterError(f"adapter {name!r}: adapters with bias or modules_to_save are not supported")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"adapter {name!r}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise AdapterError(f"adapter {name!r}: rank {rank} exceeds the server's max_lora_rank={max_rank}")
    if not isinstance(alpha, (int, float)):
        raise AdapterError(f"adapter {name!r}: lora_alpha must be a number, got {alpha!r}")
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m is None:
                    raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r} in {weights_file.name}")
                layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
                if module not in MODULES or layer >= config.num_hidden_layers:
                    raise AdapterError(f"adapter {name!r}: tensor {key!r} targets no layer of the base model")
                parts.setdefault((layer, module), {})[ab] = f.get_tensor(key)
    except SafetensorError as e:
        raise AdapterError(
            f"adapter {name!r}: {weights_file.name} is not a valid safetensors file ({e})"
        ) from None
    if not parts:
        raise AdapterError(f"adapter {name!r}: {weights_file.name} holds no LoRA tensors")
    adapter = LoraAdapter(name=name, path=path, rank=rank, scaling=float(scaling))
    for (layer, module), ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(
                f"adapter {name!r}: layer {layer} {module} lacks lora_{'A' if 'A' not in ab else 'B'}"
            )
        fan_in, fan_out = module_shape(config, module)
        a, b = ab["A"], ab["B"]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise AdapterError(
                f"adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                f"the base model needs A ({rank}, {fan_in}) and B ({fan_out}, {rank})"
            )
        adapter.weights[(layer, module)] = (a, b)
    return adapter
