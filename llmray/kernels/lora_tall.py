"""The "tall" LoRA layout: every slot's shrink folded into the base GEMM, one expand kernel per projection.

The A matrices of all S slots sit under the base weight, ``W_cat = [W ; A]`` (ΣO + S·G·R, K), so ONE GEMM
``full = x @ W_catᵀ`` (N, ΣO + S·G·R) yields the base projection AND every slot's shrink (at decode sizes the
GEMM is launch/latency-bound: ~15% more weight rows cost far less than a shrink launch). ``lora_tall_expand``
then writes ``out[n, o] = full[n, o] + scale[s] · B[s, o, :] @ full[n, ΣO + s·G·R + g·R : ... + R]`` with
s = slots[n] (no delta where s < 0) and g the member (q|k|v, gate|up) owning column o: one launch per
projection instead of a shrink and an expand. y is the GEMM's bf16 output (peft rounds ``lora_A(x)`` to the
model dtype too); the delta is accumulated in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels.lora import _block_m, _launch, _next_slot, _precision


@triton.jit(do_not_specialize=["N"])
def _tall_expand_kernel(
    full_ptr, b_ptr, slot_ptr, scale_ptr, out_ptr,
    N, O, R, GR, stride_fn, stride_bs, stride_bo, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    SEG1: tl.constexpr = 0, SEG2: tl.constexpr = 0, USE_GDC: tl.constexpr = False,
):  # fmt: skip
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o0 = tl.program_id(1) * BLOCK_O
    o = o0 + tl.arange(0, BLOCK_O)
    r = tl.arange(0, BLOCK_R)
    member = (o0 >= SEG1).to(tl.int32) if SEG1 > 0 else 0  # (member tiles never straddle: SEG % BLOCK_O == 0)
    if SEG2 > 0:
        member += (o0 >= SEG2).to(tl.int32)
    y_col = O + member * R  # + slot · G·R: this member's shrink output in the slot's block of columns
    live = m < N
    mask = live[:, None] & (o[None, :] < O)
    b_mask = (r[:, None] < R) & (o[None, :] < O)
    # before the wait (the GEMM may still run): the slots and the tile's first slot's B and scale (written
    # before the GEMM started); usually the tile's only slot
    slots = tl.load(slot_ptr + m, mask=live, other=-1)
    first = _next_slot(slots, -1)
    s0 = tl.where(first < 1 << 30, first, 0)
    b0 = tl.load(b_ptr + s0 * stride_bs + o[None, :] * stride_bo + r[:, None], mask=b_mask, other=0.0)
    scale0 = tl.load(scale_ptr + s0)
    if USE_GDC:  # launched before the GEMM finished: wait for its writes
        tl.extra.cuda.gdc_wait()
    base = tl.load(full_ptr + m[:, None] * stride_fn + o[None, :], mask=mask, other=0.0)
    y_mask = (slots == first)[:, None] & (r[None, :] < R)  # (none: a tile of base-model rows)
    y0 = tl.load(full_ptr + m[:, None] * stride_fn + y_col + s0 * GR + r[None, :], mask=y_mask, other=0.0)
    delta = tl.dot((y0.to(tl.float32) * scale0), b0.to(tl.float32), input_precision=PRECISION)
    cur = _next_slot(slots, first)
    while cur < 1 << 30:  # the tile's other slots (where two adapters' rows meet)
        rows = slots == cur
        y_off = m[:, None] * stride_fn + y_col + cur * GR + r[None, :]
        yv = tl.load(full_ptr + y_off, mask=rows[:, None] & (r[None, :] < R), other=0.0).to(tl.float32)
        yv = yv * tl.load(scale_ptr + cur)
        bv = tl.load(b_ptr + cur * stride_bs + o[None, :] * stride_bo + r[:, None], mask=b_mask, other=0.0)
        delta = tl.dot(yv, bv.to(tl.float32), delta, input_precision=PRECISION)
        cur = _next_slot(slots, cur)
    out = (base.to(tl.float32) + delta).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + m[:, None] * stride_on + o[None, :], out, mask=mask)


def lora_tall_expand(
    full: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
    members: int = 1,
    seg: tuple[int, ...] = (),
    block_o: int = 128,
    num_warps: int = 4,
    block_m: int = 0,
) -> torch.Tensor:
    """full (N, O + S·G·R) = x @ [W ; A]ᵀ, b (S, O, R) stacked B (member j's rows [seg[j-1], seg[j])),
    slots (N,) int32, scales (S,) fp32 -> out (N, O) in full's dtype: the base columns plus each row's delta.
    ``seg``: member boundaries in O (at most two, multiples of ``block_o``); ``members`` = len(seg) + 1.
    ``block_o``/``num_warps``/``block_m`` (0: by size): tuning."""
    n = full.shape[0]
    s, o, r = b.shape
    if len(seg) > 2 or any(c % block_o or not 0 < c < o for c in seg):
        raise ValueError(f"lora_tall_expand: bad member boundaries {seg} for O={o}, block_o={block_o}")
    if members != len(seg) + 1 or full.shape[1] != o + s * members * r or full.stride(1) != 1:
        raise ValueError(
            f"lora_tall_expand: full {tuple(full.shape)} does not hold O={o} base columns and "
            f"{s}x{members}x{r} shrink columns (unit column stride), seg {seg}"
        )
    out = torch.empty(n, o, device=full.device, dtype=full.dtype)
    if n == 0:
        return out
    block_m = block_m or _block_m(n)  # (benches: tile sizes)
    seg1, seg2 = (tuple(seg) + (0, 0))[:2]
    _launch(
        _tall_expand_kernel, (triton.cdiv(n, block_m), triton.cdiv(o, block_o)),
        (full, b, slots, scales, out, n, o, r, members * r, full.stride(0), b.stride(0), b.stride(1),
         out.stride(0)),
        full.device, BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_R=max(16, triton.next_power_of_2(r)),
        PRECISION=_precision(b.dtype), SEG1=seg1, SEG2=seg2, num_warps=num_warps,
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["N"])
def _tall_expand_swiglu_kernel(
    full_ptr, b_ptr, slot_ptr, scale_ptr, out_ptr,
    N, I, R, stride_fn, stride_bs, stride_bo, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):  # fmt: skip
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # columns of the gate half (the up half: I + c)
    r = tl.arange(0, BLOCK_R)
    live = m < N
    mask = live[:, None] & (c[None, :] < I)
    b_mask = (r[:, None] < R) & (c[None, :] < I)
    # before the wait: the slots, the first slot's B (gate and up) and scale (see _tall_expand_kernel)
    slots = tl.load(slot_ptr + m, mask=live, other=-1)
    first = _next_slot(slots, -1)
    s0 = tl.where(first < 1 << 30, first, 0)
    b_off = s0 * stride_bs + c[None, :] * stride_bo + r[:, None]
    bg = tl.load(b_ptr + b_off, mask=b_mask, other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_O)
    bu = tl.load(b_ptr + b_off + I * stride_bo, mask=b_mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + s0)
    if USE_GDC:  # launched before the GEMM finished: wait for its writes
        tl.extra.cuda.gdc_wait()
    row = full_ptr + m[:, None] * stride_fn
    gate = tl.load(row + c[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + I + c[None, :], mask=mask, other=0.0).to(tl.float32)
    cur = first
    while cur < 1 << 30:  # usually once (rows sorted by slot); never for a tile of base-model rows
        y_mask = (slots == cur)[:, None] & (r[None, :] < R)
        y_off = m[:, None] * stride_fn + 2 * I + cur * 2 * R + r[None, :]  # gate's y, then up's
        yg = tl.load(full_ptr + y_off, mask=y_mask, other=0.0).to(tl.float32) * scale
        yu = tl.load(full_ptr + y_off + R, mask=y_mask, other=0.0).to(tl.float32) * scale
        gate = tl.dot(yg, bg, gate, input_precision=PRECISION)
        up = tl.dot(yu, bu, up, input_precision=PRECISION)
        cur = _next_slot(slots, cur)
        if cur < 1 << 30:  # the next slot's B and scale (where two adapters' rows meet)
            b_off = cur * stride_bs + c[None, :] * stride_bo + r[:, None]
            bg = tl.load(b_ptr + b_off, mask=b_mask, other=0.0).to(tl.float32)
            bu = tl.load(b_ptr + b_off + I * stride_bo, mask=b_mask, other=0.0).to(tl.float32)
            scale = tl.load(scale_ptr + cur)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + m[:, None] * stride_on + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def lora_tall_expand_swiglu(
    full: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
    block_o: int = 64,
    num_warps: int = 4,
    block_m: int = 0,
) -> torch.Tensor:
    """The tall expand of a fused gate|up projection with the gated SwiGLU in the same launch: full
    (N, 2I + S·2·R) = x @ [W_gate ; W_up ; A]ᵀ, b (S, 2I, R) -> silu(gate + Δgate) · (up + Δup) (N, I), fp32
    math stored in full's dtype (the unfused path rounds gate|up to that dtype first)."""
    n = full.shape[0]
    s, o, r = b.shape
    if o % 2 or full.shape[1] != o + s * 2 * r or full.stride(1) != 1:
        raise ValueError(
            f"lora_tall_expand_swiglu: full {tuple(full.shape)} does not hold 2I={o} base columns and "
            f"{s}x2x{r} shrink columns (unit column stride)"
        )
    inter = o // 2
    out = torch.empty(n, inter, device=full.device, dtype=full.dtype)
    if n == 0:
        return out
    block_m = block_m or _block_m(n)  # (benches: tile sizes)
    _launch(
        _tall_expand_swiglu_kernel, (triton.cdiv(n, block_m), triton.cdiv(inter, block_o)),
        (full, b, slots, scales, out, n, inter, r, full.stride(0), b.stride(0), b.stride(1), out.stride(0)),
        full.device, BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_R=max(16, triton.next_power_of_2(r)),
        PRECISION=_precision(b.dtype), num_warps=num_warps,
    )  # fmt: skip
    return out
