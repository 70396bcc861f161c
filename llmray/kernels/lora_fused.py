"""One launch per LoRA'd projection at decode sizes: the base GEMM with every row's adapter delta folded in.

    out[n] = x[n] @ Wᵀ + scale[s] · B[s] @ (A[s] @ x[n])        s = slots[n] (-1: no delta)

The split path (``lora.py``) runs three kernels per projection: the base GEMM (cuBLAS), the shrink and the
expand (a read-modify-write of the output). At decode (a few hundred rows) each is latency-bound (~4 µs), so
the launches, not the bytes, are the LoRA cost. Here a program owns a (BLOCK_M rows x BLOCK_N columns) output
tile: its K loop loads the x tile once for two dots, the base one against W and the shrink one against the A
rows of the tile's first ``T`` slots (gathered into one (T·R, BLOCK_K) tile: rows sorted by slot put a few
adapters in a tile); the epilogue adds y @ B of those slots (each row keeping only its own slot's columns)
before the one store. Slots beyond ``T`` in a tile (rare) take one more pass over K each. Grouped outputs
(fused q|k|v, gate|up: member boundaries ``seg``, multiples of BLOCK_N) read member j's A rows and B columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels.lora import _next_slot, _precision


@triton.jit(do_not_specialize=["N", "SPLITS", "KB_PER_SPLIT"])
def _lora_linear_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, slot_ptr, scale_ptr, out_ptr, part_ptr, count_ptr,
    N, O, K, SPLITS, KB_PER_SPLIT, stride_xn, stride_wo, stride_as, stride_ar, stride_bs, stride_bo, stride_bg, stride_on,
    R: tl.constexpr, T: tl.constexpr, SEG1: tl.constexpr, SEG2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o0 = tl.program_id(1) * BLOCK_N
    o = o0 + tl.arange(0, BLOCK_N)
    member = (o0 >= SEG1).to(tl.int32) if SEG1 > 0 else 0  # which member's A rows / B columns (grouped)
    if SEG2 > 0:
        member += (o0 >= SEG2).to(tl.int32)
    live = m < N
    slots = tl.load(slot_ptr + m, mask=live, other=-1)
    # column j of the tile's shrink output belongs to its t-th slot (t = j // BLOCK_R), rank row j % BLOCK_R
    j = tl.arange(0, T * BLOCK_R)
    t = j // BLOCK_R
    rj = j % BLOCK_R
    sj = tl.full([T * BLOCK_R], 1 << 30, tl.int32)  # 1 << 30: no slot
    cur = _next_slot(slots, -1)
    for tt in tl.static_range(T):
        sj = tl.where(t == tt, cur, sj)
        cur = _next_slot(slots, cur)  # (stays 1 << 30 once the tile's slots are used up)
    jvalid = (sj < 1 << 30) & (rj < R)
    sj0 = tl.where(sj < 1 << 30, sj, 0)
    a_rows = sj0 * stride_as + (member * R + rj) * stride_ar  # (T·BLOCK_R,) offsets of the gathered A rows
    # split-K: this program sums K over [k_lo, k_hi) (whole BLOCK_K blocks); the product and the deltas are
    # linear in the K range, so each split adds its own y @ B and the partial tiles are summed at the end
    k_lo = tl.program_id(2) * KB_PER_SPLIT * BLOCK_K
    k_hi = tl.minimum(K, k_lo + KB_PER_SPLIT * BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ys = tl.zeros([BLOCK_M, T * BLOCK_R], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kin = k < K
        xv = tl.load(
            x_ptr + m[:, None] * stride_xn + k[None, :], mask=live[:, None] & kin[None, :], other=0.0
        )
        wv = tl.load(
            w_ptr + o[None, :] * stride_wo + k[:, None], mask=(o[None, :] < O) & kin[:, None], other=0.0
        )
        acc = tl.dot(xv, wv, acc, input_precision=PRECISION)
        av = tl.load(a_ptr + a_rows[None, :] + k[:, None], mask=jvalid[None, :] & kin[:, None], other=0.0)
        ys = tl.dot(xv, av, ys, input_precision=PRECISION)
    # epilogue: each row keeps its own slot's columns of ys (scaled), times the gathered B columns
    scale_j = tl.load(scale_ptr + sj0, mask=jvalid, other=0.0)
    ys = tl.where(slots[:, None] == sj[None, :], ys * scale_j[None, :], 0.0)
    b_base = b_ptr + member * stride_bg
    b_off = sj0[:, None] * stride_bs + o[None, :] * stride_bo + rj[:, None]
    bv = tl.load(b_base + b_off, mask=jvalid[:, None] & (o[None, :] < O), other=0.0)  # (T·BLOCK_R, BLOCK_N)
    acc = tl.dot(ys, bv.to(tl.float32), acc, input_precision=PRECISION)
    r = tl.arange(0, BLOCK_R)
    while cur < 1 << 30:  # slots past the first T (where many adapters' rows share a tile): one K pass each
        rows = slots == cur
        y1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kin = k < K
            xv = tl.load(
                x_ptr + m[:, None] * stride_xn + k[None, :], mask=rows[:, None] & kin[None, :], other=0.0
            )
            a_off = cur * stride_as + (member * R + r[None, :]) * stride_ar + k[:, None]
            av = tl.load(a_ptr + a_off, mask=(r[None, :] < R) & kin[:, None], other=0.0)
            y1 = tl.dot(xv, av, y1, input_precision=PRECISION)
        y1 = tl.where(rows[:, None], y1 * tl.load(scale_ptr + cur), 0.0)
        b1 = tl.load(
            b_base + cur * stride_bs + o[None, :] * stride_bo + r[:, None],
            mask=(r[:, None] < R) & (o[None, :] < O),
            other=0.0,
        )
        acc = tl.dot(y1, b1.to(tl.float32), acc, input_precision=PRECISION)
        cur = _next_slot(slots, cur)
    mask = live[:, None] & (o[None, :] < O)
    last = SPLITS < 2
    if SPLITS > 1:  # partial tiles to part (SPLITS, N, O); the tile's last program to finish adds them
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        p_off = m[:, None] * O + o[None, :]
        tl.store(part_ptr + tl.program_id(2) * N * O + p_off, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken (release)
        ticket = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        last = ticket == SPLITS - 1
        if last:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for sp in range(0, SPLITS):  # in a fixed order: the same sums whichever program came last
                acc += tl.load(part_ptr + sp * N * O + p_off, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + tile, 0)  # zero again for the next launch (CUDA graphs)
    if last:
        tl.store(out_ptr + m[:, None] * stride_on + o[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# BLOCK_M, BLOCK_N, BLOCK_K, T, num_warps, num_stages, splits (> 1: split-K; the tile's last program adds them)
Config = tuple[int, int, int, int, int, int, int]
# by step size and projection shape (benches override; None: that case runs the split kernels)
CONFIGS: dict[str, Config | None] = {
    "default": (64, 64, 64, 4, 4, 3, 1),
    "narrow": (64, 32, 64, 4, 4, 3, 1),  # few output columns, long K (o, down): more programs
    "prefill": (128, 128, 64, 2, 8, 3, 1),  # thousands of rows: compute-bound, a prompt chunk is one slot
}
_COUNTERS: dict[torch.device, torch.Tensor] = {}  # per device: split-K tickets, zero between launches
_MAX_TILES = 8192


def fused_config(n: int, o: int, k: int) -> Config | None:
    """Launch parameters for an (n, k) x (o, k)ᵀ projection (no autotuning: the same on every run)."""
    if n > 512:
        return CONFIGS["prefill"]
    return CONFIGS["narrow"] if o * 2 <= k else CONFIGS["default"]


def lora_linear_supported(n: int, weight: torch.Tensor, seg: tuple[int, ...]) -> bool:
    """Whether ``lora_linear`` runs this projection: unit stride along K, member boundaries on tile edges."""
    o, k = weight.shape
    config = fused_config(n, o, k)
    if config is None or weight.stride(1) != 1 or len(seg) > 2:
        return False
    return all(s % config[1] == 0 and 0 < s < o for s in seg)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
    seg: tuple[int, ...] = (),
    member_stride: int = 0,
    config: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """x (N, K) @ weight (O, K)ᵀ plus every row's delta -> (N, O) in x's dtype. a (S, G·R, K): member j's A
    at rows [j·R, (j+1)·R); b (S, O, R) member 0's view (``lora_expand``'s layout: members stacked along O,
    ``member_stride`` elements from one member's B to the next, 0 when stacked); seg: member boundaries in O
    (at most two, multiples of the tile width); slots (N,) int32 (-1: no delta); scales (S,) fp32.
    ``config``: (BLOCK_M, BLOCK_N, BLOCK_K, T, num_warps, num_stages[, splits]) override (benches, tests)."""
    n, k = x.shape
    o = weight.shape[0]
    r = a.shape[1] // (len(seg) + 1)
    config = config or fused_config(n, o, k)
    if config is None:
        raise ValueError(f"lora_linear: no fused config for {n} rows x ({o}, {k})")
    block_m, block_n, block_k, tiles_t, warps, stages, splits = (tuple(config) + (1,))[:7]
    if len(seg) > 2 or any(s % block_n or not 0 < s < o for s in seg):
        raise ValueError(f"lora_linear: member boundaries {seg} are not multiples of {block_n} inside O={o}")
    if weight.shape[1] != k or weight.stride(1) != 1 or b.stride(2) != 1:
        raise ValueError(f"lora_linear: weight {tuple(weight.shape)} / B need unit stride along K / R")
    out = torch.empty(n, o, device=x.device, dtype=x.dtype)
    if n == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    seg1, seg2 = (tuple(seg) + (0, 0))[:2]
    tiles = triton.cdiv(n, block_m) * triton.cdiv(o, block_n)
    kb_per_split = triton.cdiv(triton.cdiv(k, splits), block_k)  # whole BLOCK_K blocks per program
    splits = triton.cdiv(k, kb_per_split * block_k)
    counters = _COUNTERS.get(x.device)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if counters is None and not capturing and splits > 1:  # (made outside a graph capture: zeroed once)
        counters = _COUNTERS[x.device] = torch.zeros(_MAX_TILES, dtype=torch.int32, device=x.device)
    if counters is None or tiles > _MAX_TILES:
        splits, kb_per_split = 1, triton.cdiv(k, block_k)
    part = torch.empty((splits, n, o) if splits > 1 else (1,), device=x.device, dtype=torch.float32)
    if splits < 2:  # (not read with one program per tile)
        counters = torch.empty(1, dtype=torch.int32, device=x.device)
    _lora_linear_kernel[(triton.cdiv(n, block_m), triton.cdiv(o, block_n), splits)](
        x, weight, a, b, slots, scales, out, part, counters, n, o, k, splits, kb_per_split, x.stride(0),
        weight.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1), member_stride, out.stride(0),
        R=r, T=tiles_t, SEG1=seg1, SEG2=seg2, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(r)), PRECISION=_precision(a.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
