"""Batched LoRA matmuls for multi-adapter serving (punica's BGMV "shrink" and "expand").

Every row n of a packed batch carries an adapter slot ``slots[n]`` (-1 = base model, no delta):
  shrink: y[n]   = scale[s] · A[s] @ x[n]          A (S, R, K), x (N, K)   -> y (N, R) fp32
  expand: out[n] += B[s] @ y[n]                    B (S, O, R), y (N, R)   -> out (N, O) in place
Adapters of smaller rank are zero-padded to R, so one launch serves any mix of adapters and ranks.
The kernels are memory-bound mat-vecs (R ≤ 64), one program per (row, output block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, slot_ptr, scale_ptr, y_ptr,
    K, R, stride_xn, stride_as, stride_ar, stride_yn,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    slot = tl.load(slot_ptr + n)
    active = slot >= 0
    safe = tl.where(active, slot, 0)
    r_lim = tl.where(active, R, 0)  # an inactive row loads nothing
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + n * stride_xn + k, mask=k < K, other=0.0).to(tl.float32)
        a_off = safe * stride_as + r[:, None] * stride_ar + k[None, :]
        av = tl.load(a_ptr + a_off, mask=(r[:, None] < r_lim) & (k[None, :] < K), other=0.0)
        acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
    scale = tl.load(scale_ptr + safe)
    acc = tl.where(active, acc * scale, 0.0)
    tl.store(y_ptr + n * stride_yn + r, acc, mask=r < R)


@triton.jit
def _expand_kernel(
    y_ptr, b_ptr, slot_ptr, out_ptr,
    O, R, stride_yn, stride_bs, stride_bo, stride_on,
    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    pid_o = tl.program_id(1)
    slot = tl.load(slot_ptr + n)
    if slot >= 0:
        o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        r = tl.arange(0, BLOCK_R)
        yv = tl.load(y_ptr + n * stride_yn + r, mask=r < R, other=0.0)
        b_off = slot * stride_bs + o[:, None] * stride_bo + r[None, :]
        bv = tl.load(b_ptr + b_off, mask=(o[:, None] < O) & (r[None, :] < R), other=0.0).to(tl.float32)
        delta = tl.sum(bv * yv[None, :], axis=1)
        out = tl.load(out_ptr + n * stride_on + o, mask=o < O, other=0.0)
        tl.store(out_ptr + n * stride_on + o, (out.to(tl.float32) + delta).to(out.dtype), mask=o < O)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (N, K), a (S, R, K), slots (N,) int32, scales (S,) fp32 -> y (N, R) fp32."""
    n, k = x.shape
    r = a.shape[1]
    y = torch.empty(n, r, device=x.device, dtype=torch.float32)
    if n == 0:
        return y
    x = x.contiguous()
    block_r = max(16, triton.next_power_of_2(r))
    block_k = max(16, min(triton.next_power_of_2(k), 8192 // block_r))
    _shrink_kernel[(n,)](
        x, a, slots, scales, y, k, r, x.stride(0), a.stride(0), a.stride(1), y.stride(0),
        BLOCK_K=block_k, BLOCK_R=block_r,
    )  # fmt: skip
    return y


def lora_expand(y: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (N, O) += B[slots] @ y rows; y (N, R) fp32, b (S, O, R). Returns ``out``."""
    n, o = out.shape
    if n == 0:
        return out
    r = b.shape[2]
    block_r = max(16, triton.next_power_of_2(r))
    block_o = 128
    _expand_kernel[(n, triton.cdiv(o, block_o))](
        y, b, slots, out, o, r, y.stride(0), b.stride(0), b.stride(1), out.stride(0),
        BLOCK_O=block_o, BLOCK_R=block_r,
    )  # fmt: skip
    return out


def lora_delta_ref(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Torch reference (and CPU path): per-row scale[s] · B[s] @ A[s] @ x, zero where slot < 0. -> (N, O) fp32."""
    active = slots >= 0
    idx = slots.clamp(min=0).long()
    y = torch.einsum("nrk,nk->nr", a[idx].float(), x.float()) * scales[idx].unsqueeze(1)
    delta = torch.einsum("nor,nr->no", b[idx].float(), y)
    return delta * active.unsqueeze(1)
