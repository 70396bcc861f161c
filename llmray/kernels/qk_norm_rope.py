"""Per-head q/k RMSNorm and rotary embedding in one Triton launch (inference: no autograd).

Same function as ``rms_norm_ref`` on q and on k (each with its own weight, over head_dim) followed by
``rope_ref`` on both, including the rounding to the input dtype between the two: the engine gets three
launches in one (q norm, k norm, rope) and q/k may be strided views of one fused q|k|v projection row
(only the last dim must have unit stride), so the fused QKV GEMM serves multi-token steps too.
One program per token: all of its q heads, then all of its k heads, each as two halves (x1, x2):
  n = x * rsqrt(mean(x^2) + eps) * w   (fp32, rounded to the input dtype)
  out = (n1 c - n2 s, n2 c + n1 s)     (cos/sin gathered at the token's position)
Outputs are new contiguous (B, T, H, D) / (B, T, Hkv, D) tensors.

``qk_norm_rope_store`` (the engine): the same q, while k (normed and rotated, rounded to the input dtype) and
v go straight into the paged KV cache at each token's slot (what ``kv_store`` would do next, fp8 included:
clamp(x / scale, ±448) in e4m3): one launch instead of two, and k never goes through memory in between.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels._common import check_device
from llmray.kernels.reference import rms_norm_ref, rope_ref
from llmray.kernels.rope import _store_rotated, _token_cos_sin

__all__ = ["qk_norm_rope", "qk_norm_rope_ref", "qk_norm_rope_store"]


@triton.jit
def _norm_rotate(src, dst, w_ptr, c, s, s_h, so_h, n_heads, eps, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    m = (h < n_heads)[:, None]
    x1 = tl.load(src + h[:, None] * s_h + d[None, :], mask=m, other=0.0)
    x2 = tl.load(src + h[:, None] * s_h + HALF + d[None, :], mask=m, other=0.0)
    dt = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(w_ptr + d).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + d).to(tl.float32)[None, :]
    n1 = (x1 * rstd * w1).to(dt).to(tl.float32)
    n2 = (x2 * rstd * w2).to(dt).to(tl.float32)
    _store_rotated(dst + h[:, None] * so_h + d[None, :], n1, n2, c, s, HALF, m)


@triton.jit
def _qk_norm_rope_kernel(
    Q, K, QW, KW, QO, KO, POS, COS, SIN,
    T, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sqo_t, sqo_h, sko_t, sko_h, sp_b, sp_t, s_cos, HQ, HK, eps,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    d = tl.arange(0, HALF)
    b, t, c, s = _token_cos_sin(POS, COS, SIN, pid, T, sp_b, sp_t, s_cos, d, HALF, 1.0, False)
    row = pid.to(tl.int64)  # outputs are contiguous: token row b * T + t
    _norm_rotate(Q + b * sq_b + t * sq_t, QO + row * sqo_t, QW, c, s, sq_h, sqo_h, HQ, eps, HALF, BLOCK_HQ)
    _norm_rotate(K + b * sk_b + t * sk_t, KO + row * sko_t, KW, c, s, sk_h, sko_h, HK, eps, HALF, BLOCK_HK)


@triton.jit
def _to_cache(x, scale_ptr, FP8: tl.constexpr):
    """fp32 values (already rounded to the model dtype) as the cache stores them (kv_store's formula)."""
    if FP8:
        x = tl.clamp(x / tl.load(scale_ptr), -448.0, 448.0)
    return x


@triton.jit
def _qk_norm_rope_store_kernel(
    Q, K, V, QW, KW, QO, KC, VC, SLOT, KS, VS, POS, COS, SIN,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sqo_t, sqo_h, sp_t, s_cos, HQ, eps,
    HK: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, FP8: tl.constexpr,
    TRIGGER: tl.constexpr,
):  # fmt: skip
    if TRIGGER:  # (Hopper) the attention after it, launched with PDL, may start its prologue; it waits for us
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    d = tl.arange(0, HALF)
    _, t, c, s = _token_cos_sin(POS, COS, SIN, pid, 1 << 30, 0, sp_t, s_cos, d, HALF, 1.0, False)
    _norm_rotate(Q + t * sq_t, QO + t * sqo_t, QW, c, s, sq_h, sqo_h, HQ, eps, HALF, BLOCK_HQ)
    slot = tl.load(SLOT + t).to(tl.int64)
    h = tl.arange(0, BLOCK_HK)
    m = (h < HK)[:, None] & ((tl.zeros([BLOCK_HK, HALF], tl.int64) + slot) >= 0)  # full-shape mask
    src = K + t * sk_t + h[:, None] * sk_h + d[None, :]
    x1 = tl.load(src, mask=m, other=0.0)
    x2 = tl.load(src + HALF, mask=m, other=0.0)
    dt = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    n1 = (x1 * rstd * tl.load(KW + d).to(tl.float32)[None, :]).to(dt).to(tl.float32)
    n2 = (x2 * rstd * tl.load(KW + HALF + d).to(tl.float32)[None, :]).to(dt).to(tl.float32)
    r1 = (n1 * c - n2 * s).to(dt).to(tl.float32)  # rounded as qk_norm_rope's output, then kv_store's cast
    r2 = (n2 * c + n1 * s).to(dt).to(tl.float32)
    dst = slot * (HK * 2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]
    ct = KC.dtype.element_ty
    tl.store(KC + dst, _to_cache(r1, KS, FP8).to(ct), mask=m)
    tl.store(KC + dst + HALF, _to_cache(r2, KS, FP8).to(ct), mask=m)
    vsrc = V + t * sv_t + h[:, None] * sv_h + d[None, :]
    v1 = tl.load(vsrc, mask=m, other=0.0).to(tl.float32)
    v2 = tl.load(vsrc + HALF, mask=m, other=0.0).to(tl.float32)
    tl.store(VC + dst, _to_cache(v1, VS, FP8).to(ct), mask=m)
    tl.store(VC + dst + HALF, _to_cache(v2, VS, FP8).to(ct), mask=m)


def qk_norm_rope_store(
    q: torch.Tensor,  # (N, H, D) unit stride on D (views of a fused q|k|v row)
    k: torch.Tensor,  # (N, Hkv, D)
    v: torch.Tensor,  # (N, Hkv, D)
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,  # (N,) integer
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D) contiguous, the model dtype or fp8
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # (N,) int; -1 = padding, not stored
    k_scale: torch.Tensor | None = None,  # (1,) fp32 for an fp8 cache
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``qk_norm_rope`` on packed tokens whose k/v go to the paged cache (``kv_store``) in the same launch;
    returns q (N, H, D) contiguous."""
    n, hq, d = q.shape
    hk = k.shape[1]
    if k.shape != (n, hk, d) or v.shape != k.shape or d % 2 or d & (d - 1) or cos.shape[-1] != d // 2:
        raise ValueError(f"qk_norm_rope_store needs q (N, H, D), k/v (N, Hkv, D), D a power of 2: {q.shape}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or positions.shape != (n,):
        raise ValueError("qk_norm_rope_store needs unit stride along head_dim and positions of shape (N,)")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape[-2:] != (hk, d):
        raise ValueError("qk_norm_rope_store needs contiguous (num_blocks, block_size, Hkv, D) caches")
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("an fp8 KV cache needs k_scale and v_scale")
    check_device(q, k, v, q_weight, k_weight, positions, cos, sin, k_cache, v_cache, slot_mapping)
    qo = torch.empty((n, hq, d), device=q.device, dtype=q.dtype)
    if n == 0:
        return qo
    cos, sin = cos.contiguous(), sin.contiguous()
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    warps = 4 if (block_hq + 2 * block_hk) * d >= 2048 else 2
    _qk_norm_rope_store_kernel[(n,)](
        q, k, v, q_weight, k_weight, qo, k_cache, v_cache, slot_mapping,
        k_scale if fp8 else cos, v_scale if fp8 else cos, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        qo.stride(0), qo.stride(1), positions.stride(0), cos.stride(0), hq, eps,
        HK=hk, HALF=d // 2, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, FP8=fp8, TRIGGER=_trigger(q.device),
        num_warps=warps,
    )  # fmt: skip
    return qo


_TRIGGER: dict[torch.device, bool] = {}


def _trigger(device: torch.device) -> bool:
    """Whether the store kernel signals programmatic dependent launch (griddepcontrol: sm_90+)."""
    got = _TRIGGER.get(device)
    if got is None:
        got = _TRIGGER[device] = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    return got


def qk_norm_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The composition the kernel fuses: rms_norm_ref on q and k, then rope_ref."""
    return rope_ref(rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps), positions, cos, sin)


def qk_norm_rope(
    q: torch.Tensor,  # (B, T, H, D), unit stride on D
    k: torch.Tensor,  # (B, T, Hkv, D)
    q_weight: torch.Tensor,  # (D,)
    k_weight: torch.Tensor,  # (D,)
    eps: float,
    positions: torch.Tensor,  # (B, T) integer, in [0, max_pos)
    cos: torch.Tensor,  # (max_pos, D/2) fp32
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rope(rms_norm(q, q_weight), rms_norm(k, k_weight)) in one launch -> contiguous (q, k)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"qk_norm_rope needs q (B, T, H, D) and k (B, T, Hkv, D), got {q.shape}, {k.shape}")
    d = q.shape[-1]
    if d % 2 or d & (d - 1) or q_weight.shape != (d,) or k_weight.shape != (d,) or cos.shape[-1] != d // 2:
        raise ValueError("qk_norm_rope needs a power-of-2 head_dim, (D,) weights and (max_pos, D/2) tables")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or positions.shape != q.shape[:2]:
        raise ValueError("qk_norm_rope needs unit stride along head_dim and positions of shape (B, T)")
    check_device(q, k, q_weight, k_weight, positions, cos, sin)
    qo = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    ko = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    bsz, t, hq, _ = q.shape
    hk = k.shape[2]
    if bsz * t == 0:
        return qo, ko
    cos, sin = cos.contiguous(), sin.contiguous()
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    warps = 4 if (block_hq + block_hk) * d >= 2048 else 2
    _qk_norm_rope_kernel[(bsz * t,)](
        q, k, q_weight, k_weight, qo, ko, positions, cos, sin,
        t, *q.stride()[:3], *k.stride()[:3], qo.stride(1), qo.stride(2), ko.stride(1), ko.stride(2),
        *positions.stride(), cos.stride(0), hq, hk, eps,
        HALF=d // 2, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, num_warps=warps,
    )  # fmt: skip
    return qo, ko
