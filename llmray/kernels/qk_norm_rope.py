"""Per-head q/k RMSNorm and rotary embedding in one Triton launch (inference: no autograd).

Same function as ``rms_norm_ref`` on q and on k (each with its own weight, over head_dim) followed by
``rope_ref`` on both, including the rounding to the input dtype between the two: the engine gets three
launches in one (q norm, k norm, rope) and q/k may be strided views of one fused q|k|v projection row
(only the last dim must have unit stride), so the fused QKV GEMM serves multi-token steps too.
One program per token: all of its q heads, then all of its k heads, each as two halves (x1, x2):
  n = x * rsqrt(mean(x^2) + eps) * w   (fp32, rounded to the input dtype)
  out = (n1 c - n2 s, n2 c + n1 s)     (cos/sin gathered at the token's position)
Outputs are new contiguous (B, T, H, D) / (B, T, Hkv, D) tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels._common import check_device
from llmray.kernels.reference import rms_norm_ref, rope_ref
from llmray.kernels.rope import _store_rotated, _token_cos_sin

__all__ = ["qk_norm_rope", "qk_norm_rope_ref"]


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
