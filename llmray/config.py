"""Configuration dataclasses, one per boundary, validated in ``__post_init__``.

``ModelConfig`` mirrors the fields of a Hugging Face ``Qwen3Config`` (same names), so a model directory's
``config.json`` maps onto it one to one. Named presets give the shapes used across the project.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelConfig:
    """Shape of a Qwen3 decoder. Field names follow transformers' ``Qwen3Config``."""

    vocab_size: int = 151936
    hidden_size: int = 1024  # d_model
    intermediate_size: int = 3072  # SwiGLU inner width
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8  # GQA: each KV head serves heads/kv_heads query heads
    head_dim: int = 128  # may differ from hidden/heads (Qwen3 decouples them)
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be divisible by "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("rms_norm_eps and rope_theta must be positive")
        for name in ("bos_token_id", "eos_token_id"):
            tok = getattr(self, name)
            if tok is not None and not 0 <= tok < self.vocab_size:
                raise ValueError(f"{name}={tok} is outside the vocabulary [0, {self.vocab_size})")

    def num_params(self) -> int:
        """Parameter count (a tied head counted once)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h + 2 * self.head_dim
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * per_layer + h + head

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict, ignoring keys this dataclass does not model."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("head_dim") is None and "hidden_size" in d and "num_attention_heads" in d:
            kwargs["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        rope_params = d.get("rope_parameters") or {}
        if "rope_theta" not in d and "rope_theta" in rope_params:
            kwargs["rope_theta"] = rope_params["rope_theta"]
        return cls(**kwargs)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, ModelConfig] = {
    # CI: a few hundred thousand parameters, fast on one CPU core.
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=10000.0,
    ),
    # The demo's default on a laptop CPU (vocab set by the tokenizer trained on the corpus).
    "mini": ModelConfig(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rope_theta=10000.0,
    ),
    # The blog series' "seed" model: about 7.03M parameters with an 8k BPE vocabulary.
    "seed-7m": ModelConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=814,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=2048,
        rope_theta=10000.0,
    ),
    # nanoGPT's shakespeare_char (6 layers, 6 heads, 384 wide, 10.65M params), Qwen3-shaped; char vocab.
    "shakespeare-char": ModelConfig(
        vocab_size=65,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=6,
        head_dim=64,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "qwen3-0.6b": ModelConfig(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "qwen3-1.7b": ModelConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
}


@dataclass
class EngineConfig:
    """Inference-engine knobs (see llmray/engine)."""

    max_num_seqs: int = 256  # sequences per step
    max_num_batched_tokens: int = 8192  # token budget per step (prefill chunks + decodes)
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    block_size: int = 16  # tokens per KV block
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # override sizing from free memory (tests force tiny caches)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True disables CUDA graphs
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    kernels: str = "auto"
    seed: int = 0
    enable_lora: bool = False  # set up adapter slots (also implied by passing ``loras=`` to the engine)
    max_loras: int = 4  # adapter slots on the device
    max_lora_rank: int = 16
    max_cpu_loras: int = 16  # LRU of adapters in host memory
    kv_cache_dtype: str = "auto"  # auto = the model dtype; fp8 = e4m3 with per-layer scales (half the bytes)
    max_graph_tokens: int = 8192  # mixed prefill+decode steps up to this many tokens replay CUDA graphs

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto|fp8, got {self.kv_cache_dtype!r}")
        if self.max_graph_tokens < 0:
            raise ValueError(f"max_graph_tokens must be >= 0, got {self.max_graph_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.kernels not in ("auto", "torch", "triton"):
            raise ValueError(f"kernels must be auto|torch|triton, got {self.kernels!r}")
        if self.max_loras < 1 or self.max_lora_rank < 1 or self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"need max_loras >= 1, max_lora_rank >= 1 and max_cpu_loras >= max_loras; got "
                f"{self.max_loras}, {self.max_lora_rank}, {self.max_cpu_loras}"
            )


@dataclass
class LoraConfig:
    """LoRA adapter shape for fine-tuning (see llmray/train/finetune.py)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: str | list[str] = "attn"  # "attn" (q,v), "all-linear", or module names
    qlora: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    def target_modules(self) -> list[str]:
        if isinstance(self.targets, list):
            return list(self.targets)
        presets = {
            "attn": ["q_proj", "v_proj"],
            "all-attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        }
        if self.targets in presets:
            return presets[self.targets]
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not names:
            raise ValueError(f"LoRA targets {self.targets!r} name no modules")
        return names
