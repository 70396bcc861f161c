"""Training MLP GEMMs with the SwiGLU in their epilogue: one pass over the activations less each way.

    forward:   gu = x @ [Wg; Wu]^T    (M, K) x (2I, K) -> gu (M, 2I) = [g | u],  h = silu(g) * u (M, I)
    backward:  dh = dy @ Wd           (M, H) x (H, I)  -> dgu (M, 2I) = [dh u s (1 + g (1 - s)) | dh silu(g)]

(s = sigmoid(g)). The unfused path is cuBLAS's GEMM, then ``swiglu.swiglu_fused_fwd`` reading all of gu
(and in the backward cuBLAS writing dh, then ``swiglu_fused_bwd`` reading dh and gu); here the GEMM's tile
goes through the SwiGLU while it is in registers: the forward reads gu zero times (was once), the backward
never writes or reads dh. Same rounding as the unfused path: g, u and dh are rounded to bf16 before the
SwiGLU math, which runs in fp32 (fp32 accumulation; the summation order is Triton's, not cuBLAS's).

Persistent programs (one per SM) loop over (BM, BN) output tiles in GROUP_M-row groups (the weight tiles
stay in L2); operands and outputs go through TMA tensor descriptors. The forward keeps two accumulators
(the gate and the up tile of the same columns), so gu is written in the layout the unfused GEMM writes.
Needs I % BN == 0 for neither half's tiles to cross into the other's columns (checked by ``supported``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels._common import check_device, interpreting, num_sms

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

__all__ = ["gemm_swiglu", "gemm_swiglu_bwd", "gemm_swiglu_ref", "gemm_swiglu_bwd_ref", "supported"]

# (BM, BN, BK, num_stages, num_warps, GROUP_M, programs per SM): see bench/train_mlp_gemm.py
FWD_CONFIG = (128, 128, 64, 3, 8, 8, 1)
BWD_CONFIG = (128, 128, 64, 4, 8, 8, 1)
FLATTEN = False  # tl.range(flatten=) on the persistent tile loop (A/B knob)
WARP_SPECIALIZE = False  # tl.range(warp_specialize=) on it (A/B knob)
BWD_PREFETCH = False  # the backward loads its g, u tile by pointers before the GEMM (A/B knob)
BWD_PTR_STORE = False  # the backward stores dg, du by pointers (A/B knob)


@triton.jit
def _tile_mn(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile index -> (row tile, column tile), GROUP_M row tiles sweeping all columns at a time."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit
def _fwd_tile(
    A, BG, BU, G, U, H, tile, num_m, num_n, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, NS: tl.constexpr,
    EPI: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_mn(tile, num_m, num_n, GROUP_M)
    om = pid_m * BM
    on = pid_n * BN
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=NS):
        a = A.load([om, k0])  # (BM, BK)
        bg = BG.load([on, k0])  # (BN, BK)
        if UPCAST:  # the interpreter's dot reads bf16 as integers
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
        acc_g = tl.dot(a, bg.T, acc_g)
        if EPI != 0:
            bu = BU.load([on, k0])
            if UPCAST:
                bu = bu.to(tl.float32)
            acc_u = tl.dot(a, bu.T, acc_u)
    g = _round_bf16(acc_g, UPCAST)
    G.store([om, on], g.to(G.dtype))
    if EPI != 0:
        u = _round_bf16(acc_u, UPCAST)
        U.store([om, on], u.to(U.dtype))
        H.store([om, on], (g * tl.sigmoid(g) * u).to(H.dtype))


@triton.jit
def _gemm_swiglu_fwd_kernel(
    A, BG, BU, G, U, H, M, I, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, NS: tl.constexpr,
    EPI: tl.constexpr, UPCAST: tl.constexpr, FLAT: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """A: x (M, K); BG, BU: the gate / up weight rows (I, K); G, U: gu's halves (M, I); H: h (M, I).
    EPI = 0 stores the plain product A @ BG^T into G only (the bench's GEMM-alone reference)."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(I, BN)
    if WS:  # warp-specialized persistent loop (A/B knob)
        for tile in tl.range(
            tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLAT, warp_specialize=True
        ):
            _fwd_tile(A, BG, BU, G, U, H, tile, num_m, num_n, K, BM, BN, BK, GROUP_M, NS, EPI, UPCAST)
    else:
        for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLAT):
            _fwd_tile(A, BG, BU, G, U, H, tile, num_m, num_n, K, BM, BN, BK, GROUP_M, NS, EPI, UPCAST)


@triton.jit
def _bwd_tile(
    A, B, G, U, DG, DU, GP, DGP, stride_gu, stride_dgu, tile, num_m, num_n, M, I, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, NS: tl.constexpr,
    UPCAST: tl.constexpr, PREFETCH: tl.constexpr, PTR_STORE: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_mn(tile, num_m, num_n, GROUP_M)
    om = pid_m * BM
    on = pid_n * BN
    rows = om + tl.arange(0, BM)
    cols = on + tl.arange(0, BN)
    gp = GP + rows[:, None].to(tl.int64) * stride_gu + cols[None, :]  # (BM, BN) pointers into gu's gate half
    rmask = rows[:, None] < M
    if PREFETCH:  # pointer loads issued before the GEMM: they land while the tensor cores work
        g = tl.load(gp, mask=rmask, other=0.0)
        u = tl.load(gp + I, mask=rmask, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=NS):
        a = A.load([om, k0])  # (BM, BK)
        b = B.load([k0, on])  # (BK, BN)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    dh = _round_bf16(acc, UPCAST)
    if PREFETCH:
        g = g.to(tl.float32)
        u = u.to(tl.float32)
    else:
        g = G.load([om, on]).to(tl.float32)
        u = U.load([om, on]).to(tl.float32)
    sig = tl.sigmoid(g)
    dg = (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype)
    du = (dh * g * sig).to(DU.dtype)
    if PTR_STORE:
        dp = DGP + rows[:, None].to(tl.int64) * stride_dgu + cols[None, :]
        tl.store(dp, dg, mask=rmask)
        tl.store(dp + I, du, mask=rmask)
    else:
        DG.store([om, on], dg)
        DU.store([om, on], du)


@triton.jit
def _gemm_swiglu_bwd_kernel(
    A, B, G, U, DG, DU, GP, DGP, stride_gu, stride_dgu, M, I, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, NS: tl.constexpr,
    UPCAST: tl.constexpr, FLAT: tl.constexpr, WS: tl.constexpr, PREFETCH: tl.constexpr, PTR_STORE: tl.constexpr,
):  # fmt: skip
    """A: dy (M, K); B: Wd (K, I); G, U: gu's halves (M, I); DG, DU: dgu's halves (M, I) (descriptors);
    GP, DGP: gu and dgu as pointers (row strides stride_gu, stride_dgu) for PREFETCH / PTR_STORE."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(I, BN)
    if WS:
        for tile in tl.range(
            tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLAT, warp_specialize=True
        ):
            _bwd_tile(
                A, B, G, U, DG, DU, GP, DGP, stride_gu, stride_dgu, tile, num_m, num_n, M, I, K,
                BM, BN, BK, GROUP_M, NS, UPCAST, PREFETCH, PTR_STORE,
            )  # fmt: skip
    else:
        for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLAT):
            _bwd_tile(
                A, B, G, U, DG, DU, GP, DGP, stride_gu, stride_dgu, tile, num_m, num_n, M, I, K,
                BM, BN, BK, GROUP_M, NS, UPCAST, PREFETCH, PTR_STORE,
            )  # fmt: skip


@triton.jit
def _round_bf16(acc, UPCAST: tl.constexpr):
    """fp32 -> bf16 -> fp32 (round to nearest even, as the GPU's cast; the interpreter's cast truncates)."""
    if UPCAST:
        bits = acc.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return acc.to(tl.bfloat16).to(tl.float32)


def supported(x: torch.Tensor, w: torch.Tensor, config: tuple[int, ...] | None = None) -> bool:
    """Whether the fused path takes x (M, K) and the [gate; up] weight w (2I, K): bf16, unit inner strides,
    16-byte aligned rows (TMA), I a multiple of the column tile."""
    bn = (config or FWD_CONFIG)[1]
    i2, k = w.shape
    return (
        TensorDescriptor is not None
        and x.dtype == w.dtype == torch.bfloat16
        and x.dim() == 2 and x.shape[1] == k and x.stride(1) == 1 and w.stride(1) == 1
        and i2 % (2 * bn) == 0 and k % 8 == 0 and (x.stride(0) * 2) % 16 == 0 and (w.stride(0) * 2) % 16 == 0
        and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
        and not torch.compiler.is_compiling()
    )  # fmt: skip


def _desc(t: torch.Tensor, block: list[int]):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def _grid(m: int, n: int, bm: int, bn: int, per_sm: int, device: torch.device) -> tuple[int]:
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    sms = num_sms(device) if device.type == "cuda" else 4
    return (max(1, min(tiles, sms * per_sm)),)


def gemm_swiglu(
    x: torch.Tensor, w: torch.Tensor, config: tuple[int, ...] | None = None, epi: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) bf16, w (2I, K) = [Wg; Wu] -> (gu (M, 2I) = x w^T, h (M, I) = silu(g) * u).
    ``epi=0`` (bench only): the plain product x w[:I]^T in gu[:, :I], h untouched."""
    check_device(x, w)
    bm, bn, bk, ns, warps, group_m, per_sm = config or FWD_CONFIG
    if not supported(x, w, (bm, bn)):
        raise ValueError(
            f"gemm_swiglu: unsupported x {tuple(x.shape)} {x.dtype} / w {tuple(w.shape)} {w.dtype} "
            "(needs bf16, unit inner strides, 16-byte rows, I a multiple of the column tile)"
        )
    m, k = x.shape
    i = w.shape[0] // 2
    gu = torch.empty(m, 2 * i, dtype=x.dtype, device=x.device)
    h = torch.empty(m, i, dtype=x.dtype, device=x.device)
    if m == 0:
        return gu, h
    _gemm_swiglu_fwd_kernel[_grid(m, i, bm, bn, per_sm, x.device)](
        _desc(x, [bm, bk]), _desc(w[:i], [bn, bk]), _desc(w[i:], [bn, bk]),
        _desc(gu[:, :i], [bm, bn]), _desc(gu[:, i:], [bm, bn]), _desc(h, [bm, bn]), m, i, k,
        BM=bm, BN=bn, BK=bk, GROUP_M=group_m, NS=ns, EPI=epi, UPCAST=interpreting(), FLAT=FLATTEN, WS=WARP_SPECIALIZE,
        num_warps=warps, num_stages=ns,
    )  # fmt: skip
    return gu, h


def gemm_swiglu_bwd(
    dy: torch.Tensor, wd: torch.Tensor, gu: torch.Tensor, config: tuple[int, ...] | None = None
) -> torch.Tensor:
    """dy (M, H), wd (H, I) (the down projection's weight), gu (M, 2I) saved by ``gemm_swiglu`` ->
    dgu (M, 2I) = [d_gate | d_up] of h = silu(g) * u for dh = dy @ wd."""
    check_device(dy, wd, gu)
    bm, bn, bk, ns, warps, group_m, per_sm = config or BWD_CONFIG
    m, hd = dy.shape
    i = wd.shape[1]
    ok = (
        TensorDescriptor is not None and dy.dtype == wd.dtype == gu.dtype == torch.bfloat16
        and wd.shape[0] == hd and gu.shape == (m, 2 * i) and i % bn == 0 and hd % 8 == 0
        and dy.stride(1) == 1 and wd.stride(1) == 1 and gu.stride(1) == 1
        and all((t.stride(0) * 2) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (dy, wd, gu))
    )  # fmt: skip
    if not ok:
        raise ValueError(
            f"gemm_swiglu_bwd: unsupported dy {tuple(dy.shape)} {dy.dtype} / wd {tuple(wd.shape)} / gu "
            f"{tuple(gu.shape)} (needs bf16, unit inner strides, 16-byte rows, I a multiple of the column tile)"
        )
    dgu = torch.empty(m, 2 * i, dtype=dy.dtype, device=dy.device)
    if m == 0:
        return dgu
    _gemm_swiglu_bwd_kernel[_grid(m, i, bm, bn, per_sm, dy.device)](
        _desc(dy, [bm, bk]), _desc(wd, [bk, bn]), _desc(gu[:, :i], [bm, bn]), _desc(gu[:, i:], [bm, bn]),
        _desc(dgu[:, :i], [bm, bn]), _desc(dgu[:, i:], [bm, bn]), gu, dgu, gu.stride(0), dgu.stride(0), m, i, hd,
        BM=bm, BN=bn, BK=bk, GROUP_M=group_m, NS=ns, UPCAST=interpreting(), FLAT=FLATTEN, WS=WARP_SPECIALIZE,
        PREFETCH=BWD_PREFETCH, PTR_STORE=BWD_PTR_STORE,
        num_warps=warps, num_stages=ns,
    )  # fmt: skip
    return dgu


def gemm_swiglu_ref(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused reference: (gu, h) with gu rounded to x's dtype before the fp32 SwiGLU."""
    gu = (x.float() @ w.float().t()).to(x.dtype)
    g, u = gu.float().chunk(2, dim=-1)
    return gu, (torch.nn.functional.silu(g) * u).to(x.dtype)


def gemm_swiglu_bwd_ref(dy: torch.Tensor, wd: torch.Tensor, gu: torch.Tensor) -> torch.Tensor:
    dh = (dy.float() @ wd.float()).to(dy.dtype).float()
    g, u = gu.float().chunk(2, dim=-1)
    sig = torch.sigmoid(g)
    return torch.cat([dh * u * sig * (1 + g * (1 - sig)), dh * g * sig], dim=-1).to(dy.dtype)
