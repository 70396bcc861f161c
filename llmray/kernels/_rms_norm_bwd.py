"""The RMSNorm backward's helpers: the dW partial sums (``_sum_partials``, also the q/k norm's) and the backward on
persistent programs with its loads pipelined through shared memory (``_pipe_kernel``; launcher, flags and
numbers: ``llmray.kernels.rmsnorm``).

Per row (x: the normed input, rstd = 1 / rms(x), dy: the incoming gradient, ds: the residual sum's):
    x_hat = x rstd,   dx = (w dy - x_hat mean(x_hat w dy)) rstd + ds,   dw += dy x_hat (summed over rows)

The expressions are the row-range kernel's (``rmsnorm._rms_norm_bwd_tile``) in its order. The row sum's bits
follow the register layout Triton picks for it: with pointer loads the layout is the row-range kernel's and
dx is bit-identical (H200, training's dtypes, 1,024 and 4,096 wide); tiles from tensor descriptors get another
layout (dx within 1 ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # host-side tensor descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


DW_SUM = (256, 8, 4)  # (BLOCK_P, BLOCK_N, num_warps) of the one-pass dW sum: 8 columns a program


@triton.jit
def _dw_sum_kernel(PART, DW, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """dW (N,) = the column sums of the partials (P, N) fp32, stored in dW's dtype: sum and cast in one
    pass, in a fixed order (deterministic)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        prow = p0 + tl.arange(0, BLOCK_P)
        mask = (prow < P)[:, None] & cmask[None, :]
        acc += tl.load(PART + prow.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(acc, axis=0).to(DW.dtype.element_ty), mask=cmask)


def _sum_partials(part: torch.Tensor, dtype: torch.dtype, cfg: tuple[int, int, int] | None) -> torch.Tensor:
    """dW (N,) in ``dtype`` from the (P, N) fp32 partial sums."""
    p, n = part.shape
    if p == 1 and part.dtype == dtype:
        return part[0]
    if cfg is None:
        return (part[0] if p == 1 else part.sum(0)).to(dtype)
    block_p, block_n, warps = cfg
    dw = torch.empty(n, device=part.device, dtype=dtype)
    _dw_sum_kernel[(triton.cdiv(n, block_n),)](
        part, dw, p, n, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps
    )
    return dw


@triton.jit
def _tile(D, P, offs, it, rmask, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BY_DESC: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile in fp32: by its descriptor D (rows past the end read as zeros) or pointer P."""
    if BY_DESC:
        t = tl.reshape(D.load([it * BLOCK_M, 0, 0]), (BLOCK_M, BLOCK_N))
    else:
        t = tl.load(P + offs, mask=rmask[:, None], other=0.0)
    return t.to(tl.float32)


@triton.jit
def _pipe_kernel(
    DYD, XD, DSD, DXD, DX2D,  # (M, N / CH, CH) tensor descriptors with (BLOCK_M, N / CH, CH) blocks
    DY, X, DS, DX, DX2, W, RSTD, DW_PART,  # the same as pointers; W (N,), RSTD (M,), DW_PART (P, N) fp32
    stride_dy, stride_x, stride_ds, stride_dx, M, N, n_tiles,
    HAS_DS: tl.constexpr, HAS_DX2: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NS: tl.constexpr, LOADS: tl.constexpr, STORES: tl.constexpr,
    EVICT: tl.constexpr,
):  # fmt: skip
    """Persistent programs over tiles pid, pid + nprog, ... of BLOCK_M whole rows (BLOCK_N = N), their loads
    NS - 1 tiles ahead through shared memory (``tl.range``'s pipelining). LOADS: 0 = dy, x, ds by the
    tensor-memory engine (descriptors), 1 = dy by pointer (cp.async), 2 = all by pointer; STORES: 0 = dx
    (and dx2) by pointer, 1 = dx by descriptor, 2 = both. EVICT: the pointer stores' eviction policy. dW
    partials are summed in registers and written once a program (row P = pid)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(W + cols).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in tl.range(pid, n_tiles, nprog, num_stages=NS):
        rows = it * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        r64 = rows.to(tl.int64)[:, None]
        dy = _tile(DYD, DY, r64 * stride_dy + cols[None, :], it, rmask, BLOCK_M, BLOCK_N, LOADS == 0)
        x = _tile(XD, X, r64 * stride_x + cols[None, :], it, rmask, BLOCK_M, BLOCK_N, LOADS < 2)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        wdy = w[None, :] * dy
        c = tl.sum(xhat * wdy, axis=1) / N  # (BLOCK_M,)
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]
        if HAS_DS:  # gradient flowing into the residual-sum output of add_rms_norm
            dx += _tile(DSD, DS, r64 * stride_ds + cols[None, :], it, rmask, BLOCK_M, BLOCK_N, LOADS < 2)
        offs = r64 * stride_dx + cols[None, :]
        if STORES >= 1:
            DXD.store([it * BLOCK_M, 0, 0], tl.reshape(dx.to(DXD.dtype), DXD.block_shape))
        else:
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=rmask[:, None], eviction_policy=EVICT)
        if HAS_DX2:
            if STORES >= 2:
                DX2D.store([it * BLOCK_M, 0, 0], tl.reshape(dx.to(DX2D.dtype), DX2D.block_shape))
            else:
                tl.store(DX2 + offs, dx.to(DX2.dtype.element_ty), mask=rmask[:, None], eviction_policy=EVICT)
        if COMPUTE_DW:
            dw_acc += dy * xhat
    if COMPUTE_DW:
        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0))


def usable(n: int, *xs: torch.Tensor | None) -> bool:
    """Descriptors available, no torch.compile tracing (fake tensors have no addresses), power-of-two rows of
    16 to 65,536 elements, 16-byte aligned bases and row strides (of ``xs``, rows (M, n); None skipped)."""
    if TensorDescriptor is None or torch.compiler.is_compiling() or n & (n - 1) or not 16 <= n <= 65536:
        return False
    ts = [x for x in xs if x is not None]
    return all(
        x.data_ptr() % 16 == 0 and x.stride(0) >= n and x.stride(0) * x.element_size() % 16 == 0 for x in ts
    )


def _row_desc(x: torch.Tensor, block_m: int) -> object:
    """Rows (M, N) as an (M, N / CH, CH) descriptor with (block_m, N / CH, CH) blocks, CH = min(N, 256): a
    descriptor's box is at most 256 elements along each dim."""
    m, n = x.shape
    ch = min(n, 256)
    return TensorDescriptor(x, [m, n // ch, ch], [x.stride(0), ch, 1], [block_m, n // ch, ch])


def launch(
    dy, x, w, rstd, ds, dx, dx2, compute_dw: bool, block_m: int, progs: int, knobs: dict
) -> torch.Tensor:
    """``_pipe_kernel`` over rows dy, x, ds (or None) (M, N) into dx (and dx2 or None) with at most ``progs``
    programs; knobs: NS, LOADS, STORES, EVICT, num_warps. Returns the dW partials (programs, N) fp32 (dx
    itself when not compute_dw)."""
    m, n = x.shape
    tiles = triton.cdiv(m, block_m)
    progs = max(1, min(tiles, progs))
    dw_part = torch.empty((progs, n), device=x.device, dtype=torch.float32) if compute_dw else dx
    d_s, d_x2 = ds if ds is not None else x, dx2 if dx2 is not None else dx
    dyd, xd, dsd, dxd, dx2d = (_row_desc(t, block_m) for t in (dy, x, d_s, dx, d_x2))
    _pipe_kernel[(progs,)](
        dyd, xd, dsd, dxd, dx2d, dy, x, d_s, dx, d_x2, w, rstd, dw_part,
        dy.stride(0), x.stride(0), d_s.stride(0), dx.stride(0), m, n, tiles,
        HAS_DS=ds is not None, HAS_DX2=dx2 is not None, COMPUTE_DW=compute_dw, BLOCK_M=block_m,
        BLOCK_N=triton.next_power_of_2(n), **knobs,
    )  # fmt: skip
    return dw_part
