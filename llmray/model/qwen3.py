"""The Qwen3 decoder, single device, with Hugging Face ``Qwen3ForCausalLM`` parameter names.

Sources: the Qwen3 technical report and transformers' ``modeling_qwen3.py`` (pre-norm blocks with RMSNorm,
GQA with per-head q/k RMSNorm, rotary embeddings in rotate-half layout, SwiGLU MLP, optional tied head).

Seams for the rest of llmray (this file imports none of them):
- ``kernels="torch" | "triton" | "auto"`` picks the implementation of norm/rope/activation/loss (ops.py);
- ``attn_metadata`` (an ``AttentionBackend``) receives q/k/v and owns the KV cache (engine, generate);
- quantisation and LoRA wrap the ``nn.Linear`` modules from outside (peft, bitsandbytes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmray.config import ModelConfig
from llmray.model import fusion
from llmray.model.attention import AttentionBackend, causal_attention
from llmray.model.mlp import Qwen3MLP
from llmray.model.ops import ModelOps, project, resolve_ops

# training with our loss: a tied embedding/head weight's gradient in one pass (kernels/cross_entropy.py)
TIED_HEAD_GRAD = True


def _tied_path(model: nn.Module, w: torch.Tensor) -> bool:
    """The tied embedding/head gradient path applies: a tied, trainable weight, one process (a Ray Train group
    of one included), no checkpointing."""
    import torch.distributed as dist

    return (
        TIED_HEAD_GRAD
        and torch.is_grad_enabled()
        and w.requires_grad
        and w is model.model.embed_tokens.weight  # type: ignore[union-attr]
        and type(w).__name__ != "DTensor"
        and not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        and not getattr(model, "gradient_checkpointing", False)
        and not torch.compiler.is_compiling()  # a whole-model compile traces the plain lookup
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


def rope_tables(head_dim: int, max_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_pos, head_dim/2) in fp32, as HF computes them (inv_freq in fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


class Qwen3Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.qkv_weight: torch.Tensor | None = None  # set by fuse_projections (inference)
        # set from outside (LoRA): computes the fused q|k|v projection of x with weight `fused` plus per-row
        # adapter deltas, in place of F.linear(x, fused)
        self.qkv_linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, hidden)
        positions: torch.Tensor,  # (B, T)
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        ops: ModelOps,
        attn_metadata: AttentionBackend | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        # one fused q/k-norm + rope launch (inference, Triton) reads q/k as strided views of the fused row; the
        # unfused ops would copy those slices, so without it the fused GEMM serves one-token forwards only.
        # Training (Triton): the same fusion with a backward (two passes over q/k instead of six)
        norm_rope = ops.qk_norm_rope if not torch.is_grad_enabled() else ops.qk_norm_rope_train
        one_row = b * t == 1 or norm_rope is not None
        plain = type(self.q_proj) is nn.Linear or self.qkv_linear is not None
        fused = self.qkv_weight if one_row and plain else None
        d = self.head_dim
        if (
            torch.is_grad_enabled()
            and ops.qkv_norm_rope_train is not None
            and ops.linear is not None
            and type(self.q_proj) is nn.Linear
            and type(self.k_proj) is nn.Linear
            and type(self.v_proj) is nn.Linear
            and d % 2 == 0
            and d & (d - 1) == 0
        ):  # training: one q|k|v GEMM; the norm/rope node writes one fused gradient (no cat, no sum)
            qkv = ops.linear(x, [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            qw, kw, eps = self.q_norm.weight, self.k_norm.weight, self.q_norm.eps
            q, k, v = ops.qkv_norm_rope_train(
                qkv, qw, kw, eps, positions, rope_cos, rope_sin, self.num_heads, self.num_kv_heads
            )
            if attn_metadata is None:
                out = causal_attention(q, k, v, self.scale)
            else:
                out = attn_metadata.attend(self.layer_idx, q, k, v)
            return project(self.o_proj, out.reshape(b, t, self.num_heads * d), ops)
        if fused is not None and not torch.is_grad_enabled():
            nq, nk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            qkv = F.linear(x, fused) if self.qkv_linear is None else self.qkv_linear(x, fused)  # one GEMM
            q, k, v = qkv.split([nq, nk, nk], dim=-1)
            q = q.view(b, t, self.num_heads, self.head_dim)
            k = k.view(b, t, self.num_kv_heads, self.head_dim)
            v = v.view(b, t, self.num_kv_heads, self.head_dim)
        else:
            q = project(self.q_proj, x, ops).view(b, t, self.num_heads, self.head_dim)
            k = project(self.k_proj, x, ops).view(b, t, self.num_kv_heads, self.head_dim)
            v = project(self.v_proj, x, ops).view(b, t, self.num_kv_heads, self.head_dim)
        store = getattr(attn_metadata, "norm_rope_store", None) if not torch.is_grad_enabled() else None
        if norm_rope is not None and store is not None:  # engine: k/v go straight to the paged cache
            qw, kw, eps = self.q_norm.weight, self.k_norm.weight, self.q_norm.eps
            q = store(self.layer_idx, q, k, v, qw, kw, eps, positions, rope_cos, rope_sin)
            out = attn_metadata.attend(self.layer_idx, q, None, None)  # type: ignore[union-attr,arg-type]
            return project(self.o_proj, out.reshape(b, t, self.num_heads * self.head_dim), ops)
        if norm_rope is not None:
            qw, kw, eps = self.q_norm.weight, self.k_norm.weight, self.q_norm.eps
            q, k = norm_rope(q, k, qw, kw, eps, positions, rope_cos, rope_sin)
        else:
            q = ops.rms_norm(q, self.q_norm.weight, self.q_norm.eps)
            k = ops.rms_norm(k, self.k_norm.weight, self.k_norm.eps)
            q, k = ops.rope(q, k, positions, rope_cos, rope_sin)
        if attn_metadata is None:
            out = causal_attention(q, k, v, self.scale)
        else:
            out = attn_metadata.attend(self.layer_idx, q, k, v)
        return project(self.o_proj, out.reshape(b, t, self.num_heads * self.head_dim), ops)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        ops: ModelOps,
        attn_metadata: AttentionBackend | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed input for the next block's branch, residual stream) — fused add+norm."""
        eps = self.input_layernorm.eps
        if residual is None:
            residual, h = x, ops.rms_norm(x, self.input_layernorm.weight, eps)
        else:
            h, residual = ops.add_rms_norm(x, residual, self.input_layernorm.weight, eps)
        h = self.self_attn(h, positions, rope_cos, rope_sin, ops, attn_metadata)
        h, residual = ops.add_rms_norm(h, residual, self.post_attention_layernorm.weight, eps)
        return self.mlp(h, ops), residual


class Qwen3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # on the meta device (load_model builds there, then loads the weights) no init runs: a random op on a
        # meta tensor goes through torch's Python references, whose first use imports torch._dynamo (~2 CPU-s
        # in every process that loads a model: engine cores, batch actors, fine-tuning workers)
        meta = torch.empty(0).is_meta
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape)) if meta else nn.Embedding(*shape)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 causal LM. ``forward`` serves training (full causal sequences) and the engine (packed tokens)."""

    rope_cos: torch.Tensor  # (max_pos, head_dim // 2) fp32 buffer, registered in __init__
    rope_sin: torch.Tensor

    def __init__(self, config: ModelConfig, kernels: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.kernels = kernels
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if torch.empty(0).is_meta:  # computed on the CPU (see Qwen3Model); load_model recomputes them
            with torch.device("cpu"):
                cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
            cos, sin = cos.to("meta"), sin.to("meta")
        else:
            cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False
        self._ops: ModelOps | None = None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if getattr(module, "weight", None) is not None and module.weight.is_meta:
            return  # nothing to draw on the meta device (see Qwen3Model)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    # --- ops selection -------------------------------------------------------------------------
    @property
    def ops(self) -> ModelOps:
        if self._ops is None:
            self._ops = resolve_ops(self.kernels, self.model.embed_tokens.weight.device)
        return self._ops

    def set_kernels(self, kernels: str) -> None:
        """Switch between "torch", "triton" and "auto" implementations of the element-wise ops."""
        self.kernels = kernels
        self._ops = None

    def _apply(self, fn, *args, **kwargs):
        fused = self.unfuse_projections()  # (plain tensors: rebuilt from the converted weights)
        out = super()._apply(fn, *args, **kwargs)
        if fused:
            self.fuse_projections()
        self._ops = None  # re-resolve "auto" after .to(device)
        # rotary tables stay fp32 whatever dtype the weights take (as HF keeps inv_freq in fp32)
        self.rope_cos, self.rope_sin = self.rope_cos.float(), self.rope_sin.float()
        return out

    def projection_groups(self) -> list[list[torch.Tensor]]:
        """The weights each training GEMM reads together, per layer (model/fusion.py)."""
        return fusion.projection_groups(self._decoder_layers())

    def fuse_projections(self) -> None:
        """Inference: q/k/v and gate/up each as ONE GEMM over a concatenated copy of their weights (the engine
        calls it; model/fusion.py). ``.to()`` re-fuses; ``unfuse_projections`` drops the copies (call it before
        changing the weights in place)."""
        fusion.fuse_projections(self._decoder_layers())

    def unfuse_projections(self) -> bool:
        """Drop the fused copies; True if there were any."""
        return fusion.unfuse_projections(self._decoder_layers())

    def _decoder_layers(self) -> list[Qwen3DecoderLayer]:
        return [layer for layer in self.model.layers if isinstance(layer, Qwen3DecoderLayer)]

    # --- Hugging Face-style hooks used by peft / gradient checkpointing -----------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def enable_input_require_grads(self) -> None:
        self.model.embed_tokens.register_forward_hook(lambda m, i, o: o.requires_grad_(True))

    # --- forward --------------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor,  # (B, T) int64; the engine packs a step's tokens as (1, N)
        positions: torch.Tensor | None = None,  # (B, T); default 0..T-1
        attn_metadata: AttentionBackend | None = None,
        inputs_embeds: torch.Tensor | None = None,  # (B, T, hidden): the embedded input_ids, if given
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, hidden)."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        elif positions.dim() == 1:
            positions = positions.unsqueeze(0)
        ops = self.ops
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.model.layers:
            args = (x, residual, positions, self.rope_cos, self.rope_sin, ops, attn_metadata)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # recomputed in backward; bind ``layer`` now (a closure would see the last layer)
                x, residual = checkpoint(layer, *args, use_reentrant=False)
            else:
                x, residual = layer(*args)
        if residual is None:
            return ops.rms_norm(x, self.model.norm.weight, self.model.norm.eps)
        h, _ = ops.add_rms_norm(x, residual, self.model.norm.weight, self.model.norm.eps)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., hidden) -> logits (..., vocab) in fp32."""
        return self.lm_head(hidden).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_metadata: AttentionBackend | None = None,
        targets: torch.Tensor | None = None,  # (B, T) next-token ids aligned with input_ids; -100 = ignore
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32, or the mean next-token loss if ``targets`` is given.

        With targets the loss goes through ``ops.linear_cross_entropy`` so the Triton path never
        materialises the (tokens, vocab) logits.
        """
        w, box = self.lm_head.weight, None
        tied = getattr(self.ops.linear_cross_entropy, "tied_embedding", None)
        embeds = None
        if targets is not None and tied is not None and _tied_path(self, w):
            # training, tied head with our loss: the weight's one gradient leaves through the lookup's backward
            # (no cast-back of the head's gradient, no dense embedding gradient, no add of the two)
            embeds, box = tied(w, input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0))
        h = self.hidden_states(input_ids, positions, attn_metadata, inputs_embeds=embeds)
        if targets is None:
            return self.compute_logits(h)
        kw = {"tied": box} if box is not None else {}
        return self.ops.linear_cross_entropy(
            h.reshape(-1, h.shape[-1]),
            w,
            targets.reshape(-1),
            ignore_index=-100,
            label_smoothing=label_smoothing,
            **kw,
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
