"""Store new tokens' K/V into the paged cache by slot mapping (Triton kernel + torch reference).

Cache layout per layer: (num_blocks, block_size, Hkv, D), contiguous; slot = block_id * block_size + offset.
A slot of -1 skips the token (padding rows of a CUDA-graph batch).

FP8 cache (``float8_e4m3fn``, Triton ``tl.float8e4nv``): the stored value is ``clamp(x / scale, ±448)``
with one fp32 scale per cache tensor (a 1-element device tensor, so CUDA graphs read the current value);
readers multiply by the same scale. Any other cache dtype stores x as is (the scales are not read).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == FP8_DTYPE


@triton.jit
def _kv_store_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
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
    if FP8:
        k = tl.clamp(k.to(tl.float32) / tl.load(k_scale_ptr), -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) / tl.load(v_scale_ptr), -448.0, 448.0)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def kv_store(
    k: torch.Tensor,  # (N, Hkv, D)
    v: torch.Tensor,  # (N, Hkv, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # (N,) int; -1 = skip
    k_scale: torch.Tensor | None = None,  # (1,) fp32: needed for an fp8 cache
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write k[i], v[i] to cache slot slot_mapping[i] (Triton)."""
    n, hkv, d = k.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("kv_store needs the head dimension of k and v to be contiguous")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("kv_store needs contiguous (num_blocks, block_size, Hkv, D) caches")
    if n == 0:
        return
    fp8 = is_fp8(k_cache)
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("an fp8 KV cache needs k_scale and v_scale")
    _kv_store_kernel[(n,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale if fp8 else slot_mapping,
        v_scale if fp8 else slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        HKV=hkv,
        D=d,
        BLOCK_H=triton.next_power_of_2(hkv),
        BLOCK_D=triton.next_power_of_2(d),
        FP8=fp8,
    )


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """Values as the cache stores them: fp8 = clamp(x / scale) in e4m3; otherwise a plain cast."""
    if cache_dtype != FP8_DTYPE:
        return x.to(cache_dtype)
    if scale is None:
        raise ValueError("an fp8 KV cache needs its scale")
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)


def from_cache(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """Cache values back in ``dtype`` (fp8 times its scale)."""
    if x.dtype != FP8_DTYPE:
        return x.to(dtype)
    if scale is None:
        raise ValueError("an fp8 KV cache needs its scale")
    return (x.float() * scale).to(dtype)


def kv_store_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Torch reference of ``kv_store`` (the CPU path): index_put_ over the flattened slots (index_copy_ has
    no fp8 kernel on the CPU)."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    hkv, d = k.shape[1:]
    k_cache.view(-1, hkv, d).index_put_((slots,), to_cache(k[valid], k_cache.dtype, k_scale))
    v_cache.view(-1, hkv, d).index_put_((slots,), to_cache(v[valid], v_cache.dtype, v_scale))
