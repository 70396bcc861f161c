"""Rotary position embedding (rotate-half / GPT-NeoX / HF Qwen3 layout) on q and k in one Triton launch.

Same signature and numerics as ``llmray.kernels.reference.rope_ref``: q (B, T, H, D), k (B, T, Hkv, D),
positions (B, T) integer (a training batch's 0..T-1, or the engine's per-token positions with B=1),
cos/sin (max_pos, D/2) fp32 tables gathered per token; computed in fp32, stored in q.dtype.

One program per token rotates all of its q and k heads: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).
The backward is the inverse rotation (s -> -s), the same kernel. Inputs may be strided views (only the
last dim must have unit stride); outputs are new contiguous tensors, or q/k themselves with
``inplace=True`` (inference only). Positions are not range-checked on the device (that would sync):
positions must lie in [0, max_pos).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels._common import check_device
from llmray.kernels.reference import rope_ref

__all__ = ["rope", "rope_ref", "rope_apply"]


@triton.jit
def _token_cos_sin(
    POS, COS, SIN, pid, T, sp_b, sp_t, s_cos, d, half, SIGN: tl.constexpr, MASKED: tl.constexpr
):  # fmt: skip
    """(b, t) of program ``pid`` over B x T tokens, and the cos and SIGN * sin rows (1, BLOCK) at its position
    in fp32; MASKED: columns d >= half read 0 (shared with qk_norm_rope.py, whose d spans exactly half)."""
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    pos = tl.load(POS + b * sp_b + t * sp_t).to(tl.int64)
    if MASKED:
        c = tl.load(COS + pos * s_cos + d, mask=d < half, other=0.0).to(tl.float32)[None, :]
        s = SIGN * tl.load(SIN + pos * s_cos + d, mask=d < half, other=0.0).to(tl.float32)[None, :]
    else:
        c = tl.load(COS + pos * s_cos + d).to(tl.float32)[None, :]
        s = SIGN * tl.load(SIN + pos * s_cos + d).to(tl.float32)[None, :]
    return b, t, c, s


@triton.jit
def _store_rotated(dst, x1, x2, c, s, half, mask):
    """dst[:half] = x1 c - x2 s and dst[half:] = x2 c + x1 s (fp32 halves in, dst's dtype out)."""
    tl.store(dst, (x1 * c - x2 * s).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * c + x1 * s).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(src, dst, c, s, s_h, so_h, n_heads, half, d, dmask, BLOCK_H: tl.constexpr):
    """Rotate one token's ``n_heads`` heads (head stride s_h in, so_h out) by (c, s)."""
    h = tl.arange(0, BLOCK_H)
    m = (h < n_heads)[:, None] & dmask[None, :]
    x = src + h[:, None] * s_h + d[None, :]
    x1 = tl.load(x, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x + half, mask=m, other=0.0).to(tl.float32)
    _store_rotated(dst + h[:, None] * so_h + d[None, :], x1, x2, c, s, half, m)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, POS, COS, SIN,
    T, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sqo_b, sqo_t, sqo_h, sko_b, sko_t, sko_h, sp_b, sp_t, s_cos,
    HQ, HK, HALF,
    SIGN: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    b, t, c, s = _token_cos_sin(POS, COS, SIN, tl.program_id(0), T, sp_b, sp_t, s_cos, d, HALF, SIGN, True)
    _rotate_heads(
        Q + b * sq_b + t * sq_t, QO + b * sqo_b + t * sqo_t, c, s, sq_h, sqo_h, HQ, HALF, d, dmask, BLOCK_HQ
    )
    _rotate_heads(
        K + b * sk_b + t * sk_t, KO + b * sko_b + t * sko_t, c, s, sk_h, sko_h, HK, HALF, d, dmask, BLOCK_HK
    )


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"rope needs q (B, T, H, D) and k (B, T, Hkv, D), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if positions.shape != q.shape[:2] or positions.dtype.is_floating_point:
        raise ValueError(
            f"rope needs integer positions of shape (B, T)={tuple(q.shape[:2])}, "
            f"got {tuple(positions.shape)} {positions.dtype}"
        )
    head_dim = q.shape[-1]
    if head_dim % 2 or cos.dim() != 2 or cos.shape[1] != head_dim // 2 or sin.shape != cos.shape:
        raise ValueError(
            f"rope needs even head_dim and cos/sin tables (max_pos, {head_dim // 2}), got head_dim={head_dim}, "
            f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rope needs q and k with unit stride along head_dim (views of projections are fine)")


def rope_apply(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the rotation (``inverse=True`` rotates by -angle: the backward) -> (q_rot, k_rot)."""
    _check(q, k, positions, cos, sin)
    check_device(q, k, positions, cos, sin)
    if inplace:
        qo, ko = q, k
    else:
        qo = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        ko = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    bsz, t, hq, d = q.shape
    hk = k.shape[2]
    if bsz * t == 0:
        return qo, ko
    if cos.stride(1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    block_d = triton.next_power_of_2(d // 2)
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    tile = (block_hq + block_hk) * block_d
    warps = 8 if tile >= 4096 else 4 if tile >= 1024 else 2
    _rope_kernel[(bsz * t,)](
        q, k, qo, ko, positions, cos, sin,
        t, *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3], *ko.stride()[:3], *positions.stride(), cos.stride(0),
        hq, hk, d // 2,
        SIGN=-1.0 if inverse else 1.0, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return qo, ko


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, cos, sin):
        ctx.save_for_backward(positions, cos, sin)
        return rope_apply(q, k, positions, cos, sin)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):  # unused outputs arrive as zeros
        positions, cos, sin = ctx.saved_tensors
        gq, gk = rope_apply(dq, dk, positions, cos, sin, inverse=True)
        return gq, gk, None, None, None


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (B, T, H, D) and k (B, T, Hkv, D); differentiable in q and k (not the tables)."""
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("rope kernels treat the cos/sin tables as constants; they must not require grad")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _RopeFn.apply(q, k, positions, cos, sin)
    return rope_apply(q, k, positions, cos, sin)
