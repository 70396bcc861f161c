"""The paged KV cache on the device: its dtype (model dtype, or fp8 e4m3 with scales), its size, its tensors.

Sizing (CUDA): run one full-budget forward to measure peak activations, then give the cache what is left
of ``gpu_memory_utilization`` of the device (minus 1 GiB for CUDA graphs). On CPU: room for a few
full-length sequences.

FP8 (``kv_cache_dtype="fp8"``): the cache holds ``float8_e4m3fn``, half the bytes of bf16 per token, so
twice the tokens fit. One fp32 scale per layer for K and one for V (device tensors: CUDA graphs read their
current values) are calibrated at start-up from a forward over random tokens: scale = 2 x amax / 448
(headroom for inputs twice as large as the calibration's; larger values saturate at ±448, never NaN).
"""

from __future__ import annotations

import torch

from llmray.config import EngineConfig
from llmray.kernels.kv_store import FP8_DTYPE, FP8_MAX
from llmray.model.attention import causal_attention


class _AmaxRecorder:
    """An attention backend that records per-layer |k|, |v| maxima and attends causally (calibration)."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.k_amax = torch.zeros(num_layers, device=device)
        self.v_amax = torch.zeros(num_layers, device=device)
        self.scale = 1.0

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.k_amax[layer_idx] = torch.maximum(self.k_amax[layer_idx], k.detach().abs().amax().float())
        self.v_amax[layer_idx] = torch.maximum(self.v_amax[layer_idx], v.detach().abs().amax().float())
        return causal_attention(q, k, v, q.shape[-1] ** -0.5)


class KVCache:
    """(2, layers, blocks, block_size, Hkv, D) cache with per-layer views and (for fp8) per-layer scales."""

    def __init__(self, model, config: EngineConfig, max_model_len: int) -> None:
        param = next(model.parameters())
        self.device, self.model_dtype = param.device, param.dtype
        mc = model.config
        self.num_layers, self.num_kv_heads, self.head_dim = (
            mc.num_hidden_layers,
            mc.num_key_value_heads,
            mc.head_dim,
        )
        self.block_size = config.block_size
        self.fp8 = config.kv_cache_dtype == "fp8"
        self.dtype = FP8_DTYPE if self.fp8 else self.model_dtype
        self.max_blocks_per_seq = -(-max_model_len // config.block_size)
        self.num_blocks = config.num_kv_blocks or self._profile_num_blocks(model, config, max_model_len)
        shape = (2, self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.k_cache = [self.kv_cache[0, i] for i in range(self.num_layers)]
        self.v_cache = [self.kv_cache[1, i] for i in range(self.num_layers)]
        # (layers, 1) fp32; rows are the (1,) scale tensors the kernels read (None without fp8)
        self.k_scales: torch.Tensor | None = None
        self.v_scales: torch.Tensor | None = None
        if self.fp8:
            self.k_scales = torch.ones(self.num_layers, 1, device=self.device)
            self.v_scales = torch.ones(self.num_layers, 1, device=self.device)
            self.calibrate(model, config.seed)

    @property
    def block_bytes(self) -> int:
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.fp8:
            return None, None
        assert self.k_scales is not None and self.v_scales is not None, "an fp8 cache has its scales"
        return self.k_scales[layer], self.v_scales[layer]

    @torch.inference_mode()
    def calibrate(self, model, seed: int = 0, num_tokens: int = 512) -> None:
        """Set the fp8 scales from the K/V maxima of a forward over random tokens (see the module doc)."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (2, num_tokens), generator=g).to(self.device)
        rec = _AmaxRecorder(self.num_layers, self.device)
        model.hidden_states(ids, None, rec)
        assert self.k_scales is not None and self.v_scales is not None, "calibrate() is for an fp8 cache"
        self.k_scales.copy_((rec.k_amax * 2 / FP8_MAX).clamp(min=1e-6)[:, None])
        self.v_scales.copy_((rec.v_amax * 2 / FP8_MAX).clamp(min=1e-6)[:, None])

    @torch.inference_mode()
    def _profile_num_blocks(self, model, cfg: EngineConfig, max_model_len: int) -> int:
        if self.device.type != "cuda":  # CPU: room for a few full-length sequences
            return self.max_blocks_per_seq * min(cfg.max_num_seqs, 4)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        n = min(cfg.max_num_batched_tokens, max_model_len)
        ids = torch.zeros(1, n, dtype=torch.long, device=self.device)
        hidden = model.hidden_states(ids)  # a full-budget prefill step's activations
        rows = min(n, cfg.max_num_seqs)
        logits = model.compute_logits(hidden[0, :rows])
        torch.cuda.synchronize()
        vocab = logits.shape[-1]
        # + sampler temporaries
        activations = torch.cuda.max_memory_allocated() - before + 6 * rows * vocab * 4
        del hidden, logits
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        # 1 GiB: CUDA graphs and step buffers
        usable = total * cfg.gpu_memory_utilization - (total - free) - activations - (1 << 30)
        num_blocks = int(usable // self.block_bytes)
        if num_blocks < 1:
            raise ValueError(
                f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
                f"{activations / 2**30:.1f} GiB needed for activations; raise gpu_memory_utilization "
                f"({cfg.gpu_memory_utilization}) or lower max_num_batched_tokens ({cfg.max_num_batched_tokens})"
            )
        return num_blocks
