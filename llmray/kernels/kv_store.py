"""Store new tokens' K/V into the paged cache by slot mapping (Triton kernel + torch reference).

Cache layout per layer: (num_blocks, block_size, Hkv, D), contiguous; slot = block_id * block_size + offset.
A slot of -1 skips the token (padding rows of a CUDA-graph batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_store_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    slots = tl.zeros([BLOCK_H, BLOCK_D], tl.int64) + slot
    mask = (h < HKV) & (d < D) & (slots >= 0)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = slot * (HKV * D) + h * D + d
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def kv_store(
    k: torch.Tensor,  # (N, Hkv, D)
    v: torch.Tensor,  # (N, Hkv, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # (N,) int; -1 = skip
) -> None:
    """Write k[i], v[i] to cache slot slot_mapping[i] (Triton)."""
    n, hkv, d = k.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("kv_store needs the head dimension of k and v to be contiguous")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("kv_store needs contiguous (num_blocks, block_size, Hkv, D) caches")
    if n == 0:
        return
    _kv_store_kernel[(n,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        HKV=hkv,
        D=d,
        BLOCK_H=triton.next_power_of_2(hkv),
        BLOCK_D=triton.next_power_of_2(d),
    )


def kv_store_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Torch reference of ``kv_store`` (the CPU path): index_copy_ over the flattened slots."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    hkv, d = k.shape[1:]
    k_cache.view(-1, hkv, d).index_copy_(0, slots, k[valid].to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, slots, v[valid].to(v_cache.dtype))
