"""RMSNorm and fused residual-add + RMSNorm: Triton forward/backward kernels, launchers, autograd.

y = x / sqrt(mean(x^2) + eps) * w over the last dim, computed in fp32 and stored in x.dtype (as the torch
reference ``llmray.kernels.reference.rms_norm_ref``). The add variant returns (rms_norm(x + r), x + r) with the
sum rounded to torch's promoted dtype of (x, r) before the norm, exactly as ``x + residual`` in torch: under
bf16 autocast with fp32 master weights the branch output x is bf16 and the residual stream fp32, so the
sum (and the residual stream) stays fp32.

Under autocast an fp32 normed output is stored in the autocast dtype (bf16): every consumer of a norm's
output is a matmul that autocast would cast to bf16 anyway, so the values are the same and one cast
kernel (and half the bytes) is saved per norm. Outside autocast the output dtype is the reference's.

Layout: any (..., N) input is viewed as (M, N) rows; a program normalises a tile of BLOCK_M whole rows
(several narrow q/k-head rows per program, one wide row per program). The backward recomputes x_hat from
the saved per-row 1/rms; the weight gradient sum over rows is split across a fixed number of programs,
each writing an fp32 partial sum (P, N), which a second kernel sums and casts to the weight's dtype in one
pass (no atomics, deterministic). Each backward program issues the next tile's loads before this tile's
math (register double-buffering). H200, 16k rows bf16, forward + backward (bench/results/kernels_rms_bwd.json):
0.0507 ms at 1,024 wide = 1.13x torch.compile's (was 0.062 ms, 0.93x, with torch's sum + cast and no
prefetch), 0.176 ms at 4,096 = 1.20x.

Rows of 4,096 or more (power-of-two widths, Hopper) take a persistent backward with its loads pipelined
through shared memory (``_rms_norm_bwd._pipe_kernel``, BWD_PIPELINED): H200, training's dtypes, 16k x 4,096
0.3057 -> 0.2839 ms, dx bit-identical; at 1,024 wide it is no faster (0.0765 vs 0.0743 ms) and is not used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels import _rms_norm_bwd
from llmray.kernels._common import as_rows, check_device, interpreting, num_sms, row_block_config
from llmray.kernels._rms_norm_bwd import DW_SUM, _dw_sum_kernel, _sum_partials  # noqa: F401 (re-exported)
from llmray.kernels.reference import add_rms_norm_ref, rms_norm_ref

__all__ = [
    "rms_norm",
    "add_rms_norm",
    "rms_norm_ref",
    "add_rms_norm_ref",
    "rms_norm_fwd",
    "rms_norm_bwd",
    "dw_programs",
]


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, S, RSTD,  # X, R, Y, S: (M, N) rows; W: (N,); RSTD: (M,) fp32
    stride_x, stride_r, stride_y, stride_s,
    M, N, eps,
    HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)  # rounded like torch's x + residual
        tl.store(S + r64 * stride_s + cols[None, :], s, mask=mask)
        xf = s.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / N + eps)  # (BLOCK_M,)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xf * rstd[:, None] * w[None, :]
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_norm_bwd_tile(
    DS, DX, DX2, w, rows, cols, cmask, stride_ds, stride_dx, M, N, dy, x, rstd,
    HAS_DS: tl.constexpr, HAS_DX2: tl.constexpr,
):  # fmt: skip
    """dx of one tile of rows from its loaded dy, x (fp32) and rstd; returns dy * x_hat for dW.
    HAS_DX2: dx is also stored in DX2's dtype (same strides as DX)."""
    rmask = rows < M
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    xhat = x * rstd[:, None]
    wdy = w[None, :] * dy
    c = tl.sum(xhat * wdy, axis=1) / N  # (BLOCK_M,)
    dx = (wdy - xhat * c[:, None]) * rstd[:, None]
    if HAS_DS:  # gradient flowing into the residual-sum output of add_rms_norm
        dx += tl.load(DS + r64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_DX2:
        tl.store(DX2 + r64 * stride_dx + cols[None, :], dx.to(DX2.dtype.element_ty), mask=mask)
    return dy * xhat


@triton.jit
def _rms_norm_bwd_load(DY, X, RSTD, rows, cols, cmask, stride_dy, stride_x, end):
    """One tile's dy, x (fp32) and rstd; rows at or past ``end`` read as zeros."""
    rmask = rows < end
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    return dy, x, rstd


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DS, DX, DX2, DW_PART,  # DW_PART: (P, N) fp32 partial weight gradients
    stride_dy, stride_x, stride_ds, stride_dx,
    M, N, rows_per_prog,
    HAS_DS: tl.constexpr, HAS_DX2: tl.constexpr, COMPUTE_DW: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """A program walks its rows_per_prog rows a tile at a time. PREFETCH: the next tile's loads are issued
    before this tile's math (register double-buffering), so a program keeps loads in flight throughout."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row0 = pid * rows_per_prog
    end = tl.minimum(row0 + rows_per_prog, M)
    if PREFETCH:
        rows = row0 + tl.arange(0, BLOCK_M)
        dy, x, rstd = _rms_norm_bwd_load(DY, X, RSTD, rows, cols, cmask, stride_dy, stride_x, end)
        for i in range(BLOCK_M, rows_per_prog + BLOCK_M, BLOCK_M):  # rows_per_prog: a multiple of BLOCK_M
            nxt = row0 + i + tl.arange(0, BLOCK_M)
            dy_n, x_n, rstd_n = _rms_norm_bwd_load(DY, X, RSTD, nxt, cols, cmask, stride_dy, stride_x, end)
            g = _rms_norm_bwd_tile(
                DS, DX, DX2, w, rows, cols, cmask, stride_ds, stride_dx, end, N, dy, x, rstd, HAS_DS, HAS_DX2
            )
            if COMPUTE_DW:
                dw_acc += g
            rows, dy, x, rstd = nxt, dy_n, x_n, rstd_n
    else:
        for i in range(0, rows_per_prog, BLOCK_M):  # rows_per_prog is a multiple of BLOCK_M
            rows = row0 + i + tl.arange(0, BLOCK_M)
            dy, x, rstd = _rms_norm_bwd_load(DY, X, RSTD, rows, cols, cmask, stride_dy, stride_x, end)
            g = _rms_norm_bwd_tile(
                DS, DX, DX2, w, rows, cols, cmask, stride_ds, stride_dx, end, N, dy, x, rstd, HAS_DS, HAS_DX2
            )
            if COMPUTE_DW:
                dw_acc += g
    if COMPUTE_DW:
        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=cmask)


def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    config: tuple[int, int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward on rows x (M, N) [+ residual (M, N)] -> (y (M, N), sum (M, N) or None, rstd (M,)).

    The sum takes torch's promoted dtype of (x, residual); y takes ``out_dtype`` (default: the sum's, or
    x's). ``config`` = (BLOCK_M, num_warps) overrides the heuristic (bench sweeps only)."""
    m, n = x.shape
    if weight.shape != (n,):
        raise ValueError(
            f"RMSNorm weight has shape {tuple(weight.shape)}, expected ({n},) for inputs (..., {n})"
        )
    check_device(x, weight)
    sum_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = torch.empty((m, n), device=x.device, dtype=out_dtype or sum_dtype)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    s = torch.empty((m, n), device=x.device, dtype=sum_dtype) if residual is not None else None
    if m == 0:
        return y, s, rstd
    block_m, block_n, warps = row_block_config(n, m)
    if config is not None:
        block_m, warps = config
    r = residual if residual is not None else x
    _rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x, r, weight, y, s if s is not None else y, rstd,
        x.stride(0), r.stride(0), y.stride(0), s.stride(0) if s is not None else y.stride(0),
        m, n, eps,
        HAS_RES=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return y, s, rstd


def dw_programs(m: int, n: int, block_m: int, device: torch.device, per_sm: int | None = None) -> int:
    """Programs sharing the rows of the weight-gradient reduction (each writes one fp32 partial row).

    The backward is bound by memory latency: each program walks its rows one tile at a time, so narrow
    rows need several programs per SM for enough bytes in flight; with the next tile prefetched, fewer do.
    H200 sweeps at 16k rows: 1,024 wide, forward + backward with prefetch and the one-pass dW sum
    (bench/results/kernels_rms_bwd.json "rms_bwd_variants"): 4 per SM 0.0490 ms, 8 per SM 0.0535, 2 per
    SM 0.0572, 12 per SM 0.0564; 4,096 wide (one row per tile; bench/results/kernels_rms.json): 2 per SM
    0.131 ms vs 8 per SM 0.139. The partial sums add P x N x 4 bytes (written once, read once), capped at
    1/8 of the rows' own traffic."""
    blocks = triton.cdiv(m, block_m)
    if device.type != "cuda":
        return max(1, min(blocks, 4))
    per_sm = per_sm or (4 if n <= 2048 else 2)
    cap = max(1, 3 * m // 32)  # P*N*4 bytes written + read <= 1/8 of 3*M*N*2 (bf16 dy, x, dx)
    return max(1, min(blocks, per_sm * num_sms(device), cap))


DX2_ONE_PASS = True  # add_rms_norm's backward writes both input dtypes' dx in one pass (False: a cast after)
# the backward's launch when the caller passes none (training's A/B sets them): (BLOCK_M, num_warps) and
# programs per SM; None = row_block_config / dw_programs' heuristics
BWD_CONFIG: tuple[int, int] | None = None
BWD_PER_SM: int | None = None
# the backward's design (A/B): True = persistent programs, loads pipelined through shared memory
# (``_rms_norm_bwd._pipe_kernel``; Hopper or newer; power-of-two rows of at least PIPE_MIN_N), False (or where
# it does not apply) the row-range kernel. H200, 16,384 rows, bf16 dy, fp32 x and ds in, fp32 + bf16 dx out
# (bench/rms_bwd_micro.py, 2026-12-01), ms: 4,096 wide: row-range 0.3057, pipelined with pointer loads 0.2839
# (bit-identical), with descriptor loads 0.2767 (dx within 1 ulp: another reduction layout); 1,024 wide:
# row-range 0.0743, pipelined 0.0765 (pointer loads, bit-identical) / 0.0746 (descriptors), so 1,024 keeps the
# row-range kernel. Knobs: programs per SM, pipeline stages, (BLOCK_M, num_warps) or None for
# row_block_config's, loads and stores (0 / 1 / 2: see the kernel), the stores' eviction policy
BWD_PIPELINED = True
PIPE_MIN_N = 4096
PIPE_PER_SM = 2
PIPE_STAGES = 3
PIPE_CONFIG: tuple[int, int] | None = None
PIPE_LOADS = 2
PIPE_STORES = 0
PIPE_EVICT = ""  # "" or "evict_first"
PIPE_INTERPRET = False  # the interpreter runs the row-range kernel unless set (the pipelined one's CPU tests)


def rms_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    ds: torch.Tensor | None = None,
    compute_dw: bool = True,
    config: tuple[int, int] | None = None,
    programs_per_sm: int | None = None,
    prefetch: bool = True,
    dw_sum: tuple[int, int, int] | None = DW_SUM,
    dx2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward on rows: dy, x (M, N), rstd (M,), optional ds (M, N) added to dx -> (dx in x.dtype, dw or None).

    ``dx2`` (M, N), contiguous, of another dtype: dx is also written there in the same pass (add_rms_norm's
    bf16 branch input and fp32 residual under autocast each get their gradient without a cast kernel).

    dy may be of another dtype than x (a bf16 output of an fp32 input under autocast). ``config`` and
    ``programs_per_sm`` override the heuristics; ``prefetch`` issues the next tile's loads before this
    tile's math; ``dw_sum`` = (BLOCK_P, BLOCK_N, num_warps) sums the dW partials and casts them in one
    kernel, None with torch's sum(0) and .to() (bench/results/kernels_rms_bwd.json "rms_bwd_variants")."""
    m, n = x.shape
    dx = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return dx, torch.zeros_like(weight) if compute_dw else None
    if dx2 is not None and (dx2.shape != dx.shape or dx2.stride() != dx.stride()):
        raise ValueError(f"dx2 must be a contiguous ({m}, {n}) tensor, got {tuple(dx2.shape)} {dx2.stride()}")
    pipelined = BWD_PIPELINED and n >= PIPE_MIN_N and config is None and programs_per_sm is None
    if pipelined and _pipe_ok(n, dy, x, ds, dx2):
        return _bwd_pipelined(dy, x, weight, rstd, ds, dx, dx2, compute_dw, dw_sum)
    block_m, block_n, warps = row_block_config(n, m)
    config = config or BWD_CONFIG
    if config is not None:
        block_m, warps = config
    # an fp32 input (add_rms_norm's residual sum in training): 2 programs per SM (H200, 16k x 1,024, bf16 dy,
    # fp32 sum and ds in, fp32 + bf16 dx out, W1 2026-12-01: 0.0748 ms vs 0.0818 at 4 per SM, 0.0765 at 8)
    per_sm = programs_per_sm or BWD_PER_SM or (2 if x.element_size() == 4 else None)
    progs = dw_programs(m, n, block_m, x.device, per_sm)
    rows_per_prog = triton.cdiv(triton.cdiv(m, progs), block_m) * block_m
    progs = triton.cdiv(m, rows_per_prog)
    dw_part = torch.empty((progs, n), device=x.device, dtype=torch.float32) if compute_dw else dx
    d_s = ds if ds is not None else dy
    _rms_norm_bwd_kernel[(progs,)](
        dy, x, weight, rstd, d_s, dx, dx2 if dx2 is not None else dx, dw_part,
        dy.stride(0), x.stride(0), d_s.stride(0), dx.stride(0),
        m, n, rows_per_prog,
        HAS_DS=ds is not None, HAS_DX2=dx2 is not None, COMPUTE_DW=compute_dw, PREFETCH=prefetch,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    if not compute_dw:
        return dx, None
    return dx, _sum_partials(dw_part, weight.dtype, dw_sum)


def _pipe_ok(n: int, *xs: torch.Tensor | None) -> bool:
    """The pipelined backward applies: descriptors available (``_rms_norm_bwd.usable``), Hopper or newer (or
    PIPE_INTERPRET), power-of-two rows of 16 to 65,536 elements, 16-byte aligned bases and row strides."""
    first = xs[0]
    if first is None:
        return False
    dev = first.device
    if (dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] < 9) or (
        dev.type != "cuda" and not (interpreting() and PIPE_INTERPRET)
    ):
        return False
    return _rms_norm_bwd.usable(n, *xs)


def _bwd_pipelined(
    dy, x, weight, rstd, ds, dx, dx2, compute_dw: bool, dw_sum
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rms_norm_bwd`` by ``_pipe_kernel``: PIPE_PER_SM programs an SM over (BLOCK_M, N) tiles of
    row_block_config's size (the row-range kernel's) unless PIPE_CONFIG."""
    m, n = x.shape
    _, _, warps = cfg = row_block_config(n, m)
    block_m, warps = PIPE_CONFIG or (cfg[0], warps)
    progs = PIPE_PER_SM * num_sms(x.device) if x.device.type == "cuda" else 3
    knobs = dict(NS=PIPE_STAGES, LOADS=PIPE_LOADS, STORES=PIPE_STORES, EVICT=PIPE_EVICT, num_warps=warps)
    dw_part = _rms_norm_bwd.launch(dy, x, weight, rstd, ds, dx, dx2, compute_dw, block_m, progs, knobs)
    return dx, _sum_partials(dw_part, weight.dtype, dw_sum) if compute_dw else None


def _out_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The autocast dtype for an fp32 result inside an autocast region (see the module docstring)."""
    dev = x.device.type
    if dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return dtype


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
        x2 = as_rows(x)  # (M, N)
        y, _, rstd = rms_norm_fwd(x2, weight, eps, out_dtype=out_dtype)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(as_rows(dy), x2, weight, rstd, compute_dw=ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None, None


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps: float, out_dtype: torch.dtype):
        x2, r2 = as_rows(x), as_rows(residual)
        y, s, rstd = rms_norm_fwd(x2, weight, eps, residual=r2, out_dtype=out_dtype)
        assert s is not None, "rms_norm_fwd returns the sum when given a residual"
        ctx.save_for_backward(s, weight, rstd)
        ctx.x_shape, ctx.dtypes = x.shape, (x.dtype, residual.dtype)
        return y.view(x.shape), s.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, ds: torch.Tensor | None):
        s2, weight, rstd = ctx.saved_tensors
        if dy is None:  # only the residual sum was used downstream
            dy = torch.zeros_like(s2)
        ds2 = as_rows(ds) if ds is not None else None
        # dx is in the sum's dtype; an input of another dtype (the bf16 branch beside an fp32 residual under
        # autocast) gets its copy from the same pass
        other = next((d for d in ctx.dtypes if d != s2.dtype), None) if DX2_ONE_PASS else None
        dx2 = torch.empty(s2.shape, device=s2.device, dtype=other) if other is not None else None
        dx, dw = rms_norm_bwd(
            as_rows(dy), s2, weight, rstd, ds=ds2, compute_dw=ctx.needs_input_grad[2], dx2=dx2
        )
        grads = [dx2 if dx2 is not None and d == other else dx.to(d) for d in ctx.dtypes]
        return grads[0].view(ctx.x_shape), grads[1].view(ctx.x_shape), dw, None, None


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (..., N) with weight (N,); differentiable in x and weight."""
    out_dtype = _out_dtype(x, x.dtype)
    if _needs_autograd(x, weight):
        return _RMSNormFn.apply(x, weight, eps, out_dtype)
    y, _, _ = rms_norm_fwd(as_rows(x), weight, eps, out_dtype=out_dtype)
    return y.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; x and residual (..., N) of one shape.

    Mixed dtypes (bf16 x, fp32 residual under autocast) follow torch's promotion for the sum."""
    if x.shape != residual.shape:
        raise ValueError(
            f"add_rms_norm needs x and residual of one shape, got {tuple(x.shape)} and {tuple(residual.shape)}"
        )
    for t in (x, residual):
        if not t.dtype.is_floating_point:
            raise ValueError(f"add_rms_norm needs floating-point inputs, got {t.dtype}")
    out_dtype = _out_dtype(x, torch.promote_types(x.dtype, residual.dtype))
    if _needs_autograd(x, residual, weight):
        return _AddRMSNormFn.apply(x, residual, weight, eps, out_dtype)
    y, s, _ = rms_norm_fwd(as_rows(x), weight, eps, residual=as_rows(residual), out_dtype=out_dtype)
    assert s is not None, "rms_norm_fwd returns the sum when given a residual"
    return y.view(x.shape), s.view(x.shape)
