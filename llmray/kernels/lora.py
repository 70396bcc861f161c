"""Batched LoRA matmuls for multi-adapter serving (punica's SGMV/BGMV "shrink" and "expand").

Every row n of a packed batch carries an adapter slot ``slots[n]`` (-1 = base model, no delta):
  shrink: y[n]   = scale[s] · A[s] @ x[n]          A (S, R, K), x (N, K)   -> y (N, R) fp32
  expand: out[n] += B[s] @ y[n]                    B (S, O, R), y (N, R)   -> out (N, O) in place
Adapters of smaller rank are zero-padded to R, so one launch serves any mix of adapters and ranks.

Each program takes a tile of BLOCK_M rows and loops over the distinct slots in it: one ``tl.dot`` per
(slot, K block) with the rows of other slots masked out. Rows of one adapter sit next to each other (a
prefill chunk is one sequence; the runner sorts decode rows by slot), so a tile usually holds one slot and
each A/B matrix is read once per tile instead of once per row (SGMV rather than BGMV).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llmray.kernels._common import num_sms


@triton.jit
def _next_slot(slots, cur):
    """Smallest slot in the tile above ``cur`` (1 << 30, larger than any slot, when there is none)."""
    return tl.min(tl.where(slots > cur, slots, 1 << 30), axis=0)


# Sizes that change from step to step (rows, the split-K width) are not specialised on: one compiled variant
# serves every step shape (a first batch of new sizes compiles nothing while serving)
@triton.jit(do_not_specialize=["N", "KB_PER_SPLIT", "stride_ys"])
def _shrink_kernel(
    x_ptr, a_ptr, slot_ptr, scale_ptr, y_ptr,
    N, K, R, KB_PER_SPLIT, stride_xn, stride_as, stride_ar, stride_ys, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):  # fmt: skip
    if USE_GDC:  # launched before the previous kernel (the base GEMM) finished: wait for its writes
        tl.extra.cuda.gdc_wait()
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)  # this program sums K over KB_PER_SPLIT blocks of BLOCK_K from k_lo
    k_lo = split * KB_PER_SPLIT * BLOCK_K  # (a multiple of BLOCK_K: aligned, vectorised loads)
    k_end = tl.minimum(K, k_lo + KB_PER_SPLIT * BLOCK_K)
    live = m < N
    slots = tl.load(slot_ptr + m, mask=live, other=-1)
    r = tl.arange(0, BLOCK_R)
    # the tile's first slot (usually its only one): a plain K loop that the compiler pipelines (a tile of
    # base rows only computes slot 0's product and keeps none of it)
    first = _next_slot(slots, -1)
    s0 = tl.where(first < 1 << 30, first, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(k_lo, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(
            x_ptr + m[:, None] * stride_xn + k[None, :], mask=live[:, None] & (k[None, :] < K), other=0.0
        )
        a_off = s0 * stride_as + r[None, :] * stride_ar + k[:, None]
        av = tl.load(a_ptr + a_off, mask=(r[None, :] < R) & (k[:, None] < K), other=0.0)  # (BLOCK_K, R)
        acc = tl.dot(xv, av, acc, input_precision=PRECISION)
    y = tl.where((slots == first)[:, None], acc * tl.load(scale_ptr + s0), 0.0)
    cur = _next_slot(slots, first)
    while cur < 1 << 30:  # the tile's other slots (where two adapters' rows meet)
        rows = slots == cur
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(k_lo, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x_off = m[:, None] * stride_xn + k[None, :]
            xv = tl.load(x_ptr + x_off, mask=rows[:, None] & (k[None, :] < K), other=0.0)  # (M, BLOCK_K)
            a_off = cur * stride_as + r[None, :] * stride_ar + k[:, None]
            av = tl.load(a_ptr + a_off, mask=(r[None, :] < R) & (k[:, None] < K), other=0.0)
            acc = tl.dot(xv, av, acc, input_precision=PRECISION)
        y = tl.where(rows[:, None], acc * tl.load(scale_ptr + cur), y)
        cur = _next_slot(slots, cur)
    if USE_GDC:  # the expand may start launching (it waits for this grid's writes itself)
        tl.extra.cuda.gdc_launch_dependents()
    y_ptrs = y_ptr + split * stride_ys + m[:, None] * stride_yn + r[None, :]
    tl.store(y_ptrs, y, mask=(m[:, None] < N) & (r[None, :] < R))


@triton.jit(do_not_specialize=["N", "SPLITS", "stride_ys"])
def _expand_kernel(
    y_ptr, b_ptr, slot_ptr, out_ptr,
    N, O, R, stride_ys, stride_yn, stride_bs, stride_bo, stride_bg, stride_on,
    SPLITS, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, SEG1: tl.constexpr = 0, SEG2: tl.constexpr = 0, USE_GDC: tl.constexpr = False,
):  # fmt: skip
    if USE_GDC:  # launched before the shrink finished: wait for its (and the base GEMM's) writes; every
        tl.extra.cuda.gdc_wait()  # program waits, so this grid never completes before the shrink's
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o0 = tl.program_id(1) * BLOCK_O
    o = o0 + tl.arange(0, BLOCK_O)
    r = tl.arange(0, BLOCK_R)
    # grouped expand: output columns [0, SEG1) belong to member 0, [SEG1, SEG2) to member 1, the rest to the
    # last; member j's shrink output is y[..., j * R:(j + 1) * R] (0: one member)
    member = (o0 >= SEG1).to(tl.int32) if SEG1 > 0 else 0
    if SEG2 > 0:
        member += (o0 >= SEG2).to(tl.int32)
    y_ptr += member * R
    b_ptr += member * stride_bg  # member j's B columns (0: stacked along O only)
    slots = tl.load(slot_ptr + m, mask=m < N, other=-1)
    first = _next_slot(slots, -1)
    if first < 1 << 30:  # a tile of base-model rows only is left untouched
        mask = (m[:, None] < N) & (o[None, :] < O)
        ptrs = out_ptr + m[:, None] * stride_on + o[None, :]
        out = tl.load(ptrs, mask=mask, other=0.0)  # (issued before the slot-dependent loads)
        delta = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
        cur = first
        while cur < 1 << 30:  # usually once: the tile's only slot
            rows = slots == cur
            y_mask = rows[:, None] & (r[None, :] < R)
            yv = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for sp in range(SPLITS):  # the shrink's split-K partial sums, added in a fixed order
                y_off = sp * stride_ys + m[:, None] * stride_yn + r[None, :]
                yv += tl.load(y_ptr + y_off, mask=y_mask, other=0.0)
            b_off = cur * stride_bs + o[None, :] * stride_bo + r[:, None]
            bv = tl.load(
                b_ptr + b_off, mask=(r[:, None] < R) & (o[None, :] < O), other=0.0
            )  # (BLOCK_R, BLOCK_O)
            delta = tl.dot(yv, bv.to(tl.float32), delta, input_precision=PRECISION)
            cur = _next_slot(slots, cur)
        tl.store(ptrs, (out.to(tl.float32) + delta).to(out.dtype), mask=mask)


@triton.jit(do_not_specialize=["N", "KB_PER_SPLIT", "SPLITS"])
def _wide_shrink_kernel(
    x_ptr, a_ptr, slot_ptr, scale_ptr, xy_ptr, part_ptr, count_ptr,
    N, K, R, S, KB_PER_SPLIT, SPLITS, stride_xn, stride_as, stride_ar, stride_xyn,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    g = tl.program_id(1)  # member: rows [g·R, (g+1)·R) of A, columns K + g·S·R + [0, S·R) of xy
    G = tl.num_programs(1)
    # this program's K range (split-K: SPLITS programs per tile), from a multiple of BLOCK_K (aligned loads)
    k_lo = tl.program_id(2) * KB_PER_SPLIT * BLOCK_K
    k_hi = tl.minimum(K, k_lo + KB_PER_SPLIT * BLOCK_K)
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    live = m < N
    slots = tl.load(slot_ptr + m, mask=live, other=-1)
    r = tl.arange(0, BLOCK_R)
    # the tile's first slot (usually its only one): a plain K loop that the compiler pipelines, which also
    # copies x (member 0's programs); a tile of base rows only computes slot 0's product and keeps none of it
    first = _next_slot(slots, -1)
    s0 = tl.where(first < 1 << 30, first, 0)
    copy_hi = (1 - tl.minimum(g, 1)) * K  # member 0 copies x; the others copy nothing
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = live[:, None] & (k[None, :] < K)
        xv = tl.load(x_ptr + m[:, None] * stride_xn + k[None, :], mask=mask, other=0.0)  # (M, BLOCK_K)
        copy = live[:, None] & (k[None, :] < copy_hi)  # (a predicate, not a branch: the loop stays pipelined)
        tl.store(xy_ptr + m[:, None] * stride_xyn + k[None, :], xv, mask=copy)
        a_off = s0 * stride_as + (g * R + r[None, :]) * stride_ar + k[:, None]
        av = tl.load(a_ptr + a_off, mask=(r[None, :] < R) & (k[:, None] < K), other=0.0)  # (BLOCK_K, R)
        acc = tl.dot(xv, av, acc, input_precision=PRECISION)
    y = tl.where((slots == first)[:, None], acc * tl.load(scale_ptr + s0), 0.0)
    cur = _next_slot(slots, first)
    while cur < 1 << 30:  # the tile's other slots (where two adapters' rows meet)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(
                x_ptr + m[:, None] * stride_xn + k[None, :],
                mask=live[:, None] & (k[None, :] < K),
                other=0.0,
            )
            a_off = cur * stride_as + (g * R + r[None, :]) * stride_ar + k[:, None]
            av = tl.load(a_ptr + a_off, mask=(r[None, :] < R) & (k[:, None] < K), other=0.0)
            acc = tl.dot(xv, av, acc, input_precision=PRECISION)
        y = tl.where((slots == cur)[:, None], acc * tl.load(scale_ptr + cur), y)
        cur = _next_slot(slots, cur)
    last = SPLITS < 2
    if SPLITS > 1:  # partial sums to part (SPLITS, N, G·R); the tile's last program to finish adds them
        p_off = m[:, None] * (G * R) + g * R + r[None, :]
        p_mask = live[:, None] & (r[None, :] < R)
        tl.store(part_ptr + tl.program_id(2) * N * G * R + p_off, y, mask=p_mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken (release)
        ticket = tl.atomic_add(count_ptr + tile * G + g, 1, sem="acq_rel")
        last = ticket == SPLITS - 1
        if last:
            y = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for sp in range(0, SPLITS):  # in a fixed order: the same sums whichever program came last
                y += tl.load(part_ptr + sp * N * G * R + p_off, mask=p_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + tile * G + g, 0)  # zero again for the next launch (CUDA graphs)
    if last:
        yv = y.to(xy_ptr.dtype.element_ty)
        col = K + g * S * R + r[None, :]
        for s in range(0, S):  # every slot's block of this member: the row's own slot gets y, the others zero
            val = tl.where((slots == s)[:, None], yv, 0.0)
            tl.store(
                xy_ptr + m[:, None] * stride_xyn + col + s * R, val, mask=live[:, None] & (r[None, :] < R)
            )


_COUNTERS: dict[torch.device, torch.Tensor] = {}  # per device: split-K tickets, zero between launches
_MAX_TICKETS = 8192


def _wide_splits(tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """Programs per tile along K: 1 on the GPU (the engine runs the wide path for large steps only, where the
    row tiles fill the SMs; split-K is for benches that pass ``splits``); 2 under the interpreter (tests)."""
    if device.type != "cuda":
        return 2 if k > block_k else 1
    return 1


def _block_m(n: int) -> int:
    return 16 if n <= 1024 else 64


# Programmatic dependent launch (Hopper+): the shrink and the expand are launched while the kernel before them
# drains (each waits for its predecessor's writes with griddepcontrol.wait): at decode sizes the launch
# latency, not the work, is most of their cost. False (or LLMRAY_LORA_PDL=0): plain launches (A/B; set before
# graphs are captured).
PDL = os.environ.get("LLMRAY_LORA_PDL", "1") != "0"
_pdl_ok: dict[torch.device, bool] = {}


def _pdl(device: torch.device) -> bool:
    """Whether to launch with PDL on ``device`` (sm_90+, and the Triton launcher took it before)."""
    if not PDL or device.type != "cuda":
        return False
    if device not in _pdl_ok:
        _pdl_ok[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return _pdl_ok[device]


def _launch(kernel, grid, args: tuple, device: torch.device, **meta) -> None:
    """``kernel[grid](*args, **meta)``, with PDL where ``_pdl`` allows (a launcher without it: plain, once)."""
    if _pdl(device):
        try:
            kernel[grid](*args, **meta, USE_GDC=True, launch_pdl=True)
            return
        except TypeError:  # (a Triton without launch_pdl: remember, launch plainly)
            _pdl_ok[device] = False
    kernel[grid](*args, **meta)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 models keep fp32 products


def _num_splits(tiles: int, k: int, device: torch.device) -> int:
    """Split K so that a small batch (decode: 16 row tiles) still fills the GPU: ~2 programs per SM."""
    if device.type != "cuda":
        return 2 if k > 64 else 1  # the interpreter: still exercise the split path
    return max(1, min(16, triton.cdiv(2 * num_sms(device), tiles), k // 128))


def lora_shrink(
    x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor, splits: int | None = None
) -> torch.Tensor:
    """x (N, K), a (S, R, K), slots (N,) int32, scales (S,) fp32 -> y (splits, N, R) fp32 partial sums over
    K splits (``lora_expand`` adds them; ``y.sum(0)`` is the shrink result). ``splits``: override (benches)."""
    n, k = x.shape
    r = a.shape[1]
    block_m = _block_m(n)
    tiles = triton.cdiv(n, block_m)
    splits = splits or _num_splits(tiles, k, x.device)
    y = torch.empty(splits, n, r, device=x.device, dtype=torch.float32)
    if n == 0:
        return y
    x = x.contiguous()
    block_r = max(16, triton.next_power_of_2(r))
    kb_per_split = triton.cdiv(triton.cdiv(k, splits), 64)  # blocks of BLOCK_K=64
    _launch(
        _shrink_kernel, (tiles, splits),
        (x, a, slots, scales, y, n, k, r, kb_per_split, x.stride(0), a.stride(0), a.stride(1), y.stride(0),
         y.stride(1)),
        x.device, BLOCK_M=block_m, BLOCK_K=64, BLOCK_R=block_r, PRECISION=_precision(a.dtype),
    )  # fmt: skip
    return y


def lora_expand(
    y: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    out: torch.Tensor,
    seg: tuple[int, ...] = (),
    block_o: int = 128,
    num_warps: int = 4,
    member_stride: int = 0,
) -> torch.Tensor:
    """out (N, O) += B[slots] @ y rows; y (N, R) or (splits, N, R) fp32, b (S, O, R). Returns ``out``.

    Grouped (``seg`` = the member boundaries in O, at most two, multiples of 128): members stacked along O
    (B rows [seg[j-1], seg[j]) belong to member j) and y (splits, N, G·R) holds member j's shrink output at
    columns [j·R, (j+1)·R): one launch for a fused q|k|v or gate|up output; ``member_stride``: elements from
    member j's B to member j+1's at the same (slot, row) (0: B is stacked along O only; else ``b`` is member
    0's view, see ``lora_wide_shrink``). ``block_o``/``num_warps``: tuning."""
    n, o = out.shape
    if n == 0:
        return out
    y = y.unsqueeze(0) if y.dim() == 2 else y
    r = b.shape[2]
    block_m = _block_m(n)
    block_r = max(16, triton.next_power_of_2(r))
    if len(seg) > 2 or any(s % block_o or not 0 < s < o for s in seg) or y.shape[-1] != r * (len(seg) + 1):
        raise ValueError(
            f"grouped lora_expand: bad member boundaries {seg} for O={o}, R={r}, y {tuple(y.shape)}"
        )
    seg1, seg2 = (tuple(seg) + (0, 0))[:2]
    _launch(
        _expand_kernel, (triton.cdiv(n, block_m), triton.cdiv(o, block_o)),
        (y, b, slots, out, n, o, r, y.stride(0), y.stride(1), b.stride(0), b.stride(1), member_stride,
         out.stride(0)),
        out.device, SPLITS=y.shape[0], BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_R=block_r,
        PRECISION=_precision(b.dtype), SEG1=seg1, SEG2=seg2, num_warps=num_warps,
    )  # fmt: skip
    return out


def lora_wide_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
    members: int = 1,
    block_k: int = 128,
    splits: int | None = None,
) -> torch.Tensor:
    """The input of a "wide" LoRA GEMM: x (N, K), a (S, G·R, K) -> xy (N, K + G·S·R) in x's dtype where
    xy[:, :K] = x and xy[n, K + g·S·R + s·R : ... + R] = scale[s] · A[s, g] @ x[n] if slots[n] == s, else 0.

    ``xy @ [W | B_0 | ... | B_{G-1}]ᵀ`` is then the base projection plus every row's adapter delta in ONE GEMM,
    with W (O, K) and member g's B laid out (O, S·R) (zero outside member g's output rows): the expand is
    folded into the base GEMM (no read-modify-write of the output, no extra launch). Few row tiles (decode)
    split K over more programs; the last of a tile's programs to finish adds their partial sums in a fixed
    order (deterministic). ``splits``/``block_k``: overrides (benches, tests)."""
    n, k = x.shape
    s, gr, _ = a.shape
    r = gr // members
    xy = torch.empty(n, k + members * s * r, device=x.device, dtype=x.dtype)
    if n == 0:
        return xy
    x = x.contiguous()
    block_m = 16 if n <= 4096 else 64
    tiles = triton.cdiv(n, block_m)
    if splits is None:
        splits = _wide_splits(tiles * members, k, block_k, x.device)
    kb_per_split = triton.cdiv(triton.cdiv(k, splits), block_k)  # blocks of block_k per program
    splits = triton.cdiv(k, kb_per_split * block_k)
    counters = _COUNTERS.get(x.device)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if counters is None and not capturing:  # (made outside a graph capture, which would not zero it)
        counters = _COUNTERS[x.device] = torch.zeros(_MAX_TICKETS, dtype=torch.int32, device=x.device)
    if counters is None or tiles * members > _MAX_TICKETS:
        splits, kb_per_split = 1, triton.cdiv(k, block_k)
        counters = torch.empty(1, dtype=torch.int32, device=x.device)  # (not read: one program per tile)
    part = torch.empty((splits, n, gr) if splits > 1 else (1,), device=x.device, dtype=torch.float32)
    _wide_shrink_kernel[(tiles, members, splits)](
        x, a, slots, scales, xy, part, counters, n, k, r, s, kb_per_split, splits, x.stride(0), a.stride(0),
        a.stride(1), xy.stride(0),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=max(16, triton.next_power_of_2(r)),
        PRECISION=_precision(a.dtype),
    )  # fmt: skip
    return xy


def lora_delta_ref(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Torch reference (and CPU path): per-row scale[s] · B[s] @ A[s] @ x, zero where slot < 0. -> (N, O) fp32."""
    active = slots >= 0
    idx = slots.clamp(min=0).long()
    y = torch.einsum("nrk,nk->nr", a[idx].float(), x.float()) * scales[idx].unsqueeze(1)
    delta = torch.einsum("nor,nr->no", b[idx].float(), y)
    return delta * active.unsqueeze(1)
