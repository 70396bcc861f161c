"""One launch for a LoRA'd projection's deltas at decode sizes: the shrink and the expand in one kernel.

    out[n] += scale[s] · B[s] @ (A[s] @ x[n])        s = slots[n] (-1: no delta)

The split path (``lora.py``) runs two kernels after the base GEMM: the shrink (split-K over many programs)
and the expand (a read-modify-write of the output). At decode (a few hundred rows) each is latency-bound
(~3.7 µs on an H200 in a CUDA graph, whatever its size), so the launches, not the bytes, are the LoRA cost.
Here a program owns a (BLOCK_M rows x BLOCK_N columns) output tile and recomputes its rows' rank-R shrink
(x·A is R x K per row: cheap) before adding y @ B to the tile: one launch instead of two. The A rows of the
tile's first ``T`` slots are gathered into one (T·R, BLOCK_K) tile (rows sorted by slot put one or two
adapters in a small tile); each row keeps only its own slot's columns of the shrink. Slots beyond ``T`` in a
tile (rare) take one more pass over K each. Grouped outputs (fused q|k|v, gate|up: member boundaries
``seg``, multiples of BLOCK_N) read member j's A rows and B columns. (Folding the base GEMM in as well was
measured slower: a Triton GEMM at these shapes costs more than cuBLAS's plus this kernel.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels.lora import _next_slot, _precision


@triton.jit(do_not_specialize=["N"])
def _lora_delta_kernel(
    x_ptr, a_ptr, b_ptr, slot_ptr, scale_ptr, out_ptr,
    N, O, K, stride_xn, stride_as, stride_ar, stride_bs, stride_bo, stride_bg, stride_on,
    R: tl.constexpr, T: tl.constexpr, SEG1: tl.constexpr, SEG2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # the column tiles of one row tile are launched next to each other: their x rows come from the L2
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    o0 = tl.program_id(0) * BLOCK_N
    o = o0 + tl.arange(0, BLOCK_N)
    member = (o0 >= SEG1).to(tl.int32) if SEG1 > 0 else 0  # which member's A rows / B columns (grouped)
    if SEG2 > 0:
        member += (o0 >= SEG2).to(tl.int32)
    live = m < N
    slots = tl.load(slot_ptr + m, mask=live, other=-1)
    first = _next_slot(slots, -1)
    if first < 1 << 30:  # a tile of base-model rows only is left untouched
        mask = live[:, None] & (o[None, :] < O)
        ptrs = out_ptr + m[:, None] * stride_on + o[None, :]
        out = tl.load(ptrs, mask=mask, other=0.0)  # (issued before the K loop: its latency overlaps)
        # column j of the tile's shrink belongs to its t-th slot (t = j // BLOCK_R), rank row j % BLOCK_R
        j = tl.arange(0, T * BLOCK_R)
        t = j // BLOCK_R
        rj = j % BLOCK_R
        sj = tl.full([T * BLOCK_R], 1 << 30, tl.int32)  # 1 << 30: no slot
        cur = first
        for tt in tl.static_range(T):
            sj = tl.where(t == tt, cur, sj)
            cur = _next_slot(slots, cur)  # (stays 1 << 30 once the tile's slots are used up)
        jvalid = (sj < 1 << 30) & (rj < R)
        sj0 = tl.where(sj < 1 << 30, sj, 0)
        b_base = b_ptr + member * stride_bg
        b_off = sj0[:, None] * stride_bs + o[None, :] * stride_bo + rj[:, None]
        bv = tl.load(
            b_base + b_off, mask=jvalid[:, None] & (o[None, :] < O), other=0.0
        )  # (T·BLOCK_R, BLOCK_N)
        scale_j = tl.load(scale_ptr + sj0, mask=jvalid, other=0.0)
        a_rows = sj0 * stride_as + (member * R + rj) * stride_ar  # (T·BLOCK_R,) the gathered A rows
        ys = tl.zeros([BLOCK_M, T * BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kin = k < K
            xv = tl.load(
                x_ptr + m[:, None] * stride_xn + k[None, :], mask=live[:, None] & kin[None, :], other=0.0
            )
            av = tl.load(a_ptr + a_rows[None, :] + k[:, None], mask=jvalid[None, :] & kin[:, None], other=0.0)
            ys = tl.dot(xv, av, ys, input_precision=PRECISION)
        # each row keeps its own slot's columns of the shrink (scaled), times the gathered B columns
        ys = tl.where(slots[:, None] == sj[None, :], ys * scale_j[None, :], 0.0)
        delta = tl.dot(ys, bv.to(tl.float32), input_precision=PRECISION)
        r = tl.arange(0, BLOCK_R)
        while cur < 1 << 30:  # slots past the first T (where many adapters' rows share a tile): a pass each
            rows = slots == cur
            y1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
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
            delta = tl.dot(y1, b1.to(tl.float32), delta, input_precision=PRECISION)
            cur = _next_slot(slots, cur)
        tl.store(ptrs, (out.to(tl.float32) + delta).to(out.dtype), mask=mask)


# BLOCK_M, BLOCK_N, BLOCK_K, T, num_warps, num_stages
Config = tuple[int, int, int, int, int, int]
# by step size and projection width (benches override; None: that case runs the split kernels)
# H200, qwen3-0.6b, 16 adapters, 256 rows (bench/lora_fused.py, W2): every config tried was slower than the
# split kernels (q|k|v 0.390 vs 0.379 ms a forward, o 0.423 vs 0.372, gate|up 0.482 vs 0.427, down 0.541 vs
# 0.421: one program's K loop over all of K is a longer chain than two split-K launches), so all are None
CONFIGS: dict[str, Config | None] = {
    "wide": None,  # decode: q|k|v, gate|up (4096, 6144 columns); tried (16, 256, 128, 2, 4, 3)
    "narrow": None,  # decode: o, down (1024 columns); tried (16, 128, 128, 2, 4, 3)
    "prefill": None,  # steps over MAX_ROWS rows; 8192 rows (128, 256, 64, 1, 8, 3): 21.2 vs 17.1 ms
}
MAX_ROWS = 512


def fused_config(n: int, o: int, k: int) -> Config | None:
    """Launch parameters for the deltas of an (n, k) x (o, k)ᵀ projection (no autotuning)."""
    if n > MAX_ROWS:
        return CONFIGS["prefill"]
    return CONFIGS["wide"] if o >= 4096 else CONFIGS["narrow"]


def lora_delta_supported(n: int, o: int, k: int, seg: tuple[int, ...]) -> bool:
    """Whether ``lora_delta`` runs these deltas: a config for the size, member boundaries on tile edges."""
    config = fused_config(n, o, k)
    if config is None or len(seg) > 2:
        return False
    return all(s % config[1] == 0 and 0 < s < o for s in seg)


def lora_delta(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor,
    seg: tuple[int, ...] = (),
    member_stride: int = 0,
    config: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """out (N, O) += every row's delta for x (N, K), in place (one launch); returns ``out``. a (S, G·R, K):
    member j's A at rows [j·R, (j+1)·R); b (S, O, R) member 0's view (``lora_expand``'s layout: members
    stacked along O, ``member_stride`` elements from one member's B to the next, 0 when stacked); seg: member
    boundaries in O (at most two, multiples of BLOCK_N); slots (N,) int32 (-1: no delta); scales (S,) fp32.
    ``config``: (BLOCK_M, BLOCK_N, BLOCK_K, T, num_warps, num_stages) override (benches, tests)."""
    n, k = x.shape
    o = out.shape[1]
    r = a.shape[1] // (len(seg) + 1)
    config = config or fused_config(n, o, k)
    if config is None:
        raise ValueError(f"lora_delta: no config for {n} rows x ({o}, {k})")
    block_m, block_n, block_k, tiles_t, warps, stages = config
    if len(seg) > 2 or any(s % block_n or not 0 < s < o for s in seg):
        raise ValueError(f"lora_delta: member boundaries {seg} are not multiples of {block_n} inside O={o}")
    if b.stride(2) != 1 or out.stride(1) != 1:
        raise ValueError("lora_delta: B and out need unit stride along R / O")
    if n == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    seg1, seg2 = (tuple(seg) + (0, 0))[:2]
    _lora_delta_kernel[(triton.cdiv(o, block_n), triton.cdiv(n, block_m))](
        x, a, b, slots, scales, out, n, o, k, x.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        member_stride, out.stride(0),
        R=r, T=tiles_t, SEG1=seg1, SEG2=seg2, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(r)), PRECISION=_precision(a.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
