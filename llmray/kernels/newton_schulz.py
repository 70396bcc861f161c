"""Symmetric batched products for Muon's Newton-Schulz iteration: only the upper triangle is computed.

Newton-Schulz forms, per iteration, A = X X^T (r, r) and P = b A + c A^2 (A symmetric, so A^2 = A A^T
is the same product). Both outputs are symmetric: ``sym_gram`` computes the tiles that reach the diagonal
or lie above it (T (T + 1) / 2 of T^2 square tiles: 36 of 64 at r = 1024 with 128-row tiles) and stores
each element below the diagonal as the mirror of its upper twin, so these two products cost ~56% of a full
GEMM's FLOPs. The epilogue folds in ``beta * S + diag * I`` (P = c A A^T + b A + a I in one pass: no copy
of A into the output, no separate diagonal add) and per-matrix scales from |X|_F^2 (``norm_sq``).

    out[n] = alpha * X[n] X[n]^T (+ beta * S[n]) (+ diag * I)      X: (n, r, k) any strides, out (n, r, r)

fp32 accumulation, stored in ``out``'s dtype (bf16 in Muon), as ``torch.bmm`` / ``baddbmm`` compute it.
Launch options (module flags, for A/B on the GPU): ``SYM_TMA`` loads X and Y tiles by TMA tensor
descriptors (contiguous stacks; pointer loads otherwise), ``SYM_TMA_OUT`` stores by descriptors too,
``SYM_PERSIST`` = p > 0 launches p programs per SM that loop over the tiles. (H200, 9th session: (BM, 2 BM)
tiles, element masks on the tiles that cross the diagonal, ran 1.7x slower than square ones: removed.)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from llmray.kernels._common import check_device, interpreting

__all__ = ["sym_gram", "sym_gram_ref", "newton_schulz_sym", "newton_schulz_gram", "DEFAULT_CONFIG"]

# (BLOCK_M, BLOCK_K, num_warps, num_stages): the best of a sweep on the H200 (Muon's stacks of qwen3-0.6b, all
# five shapes: (128, 64, 4, 3) 13.67 ms, (128, 64, 8, 4) 13.91, (128, 128, 8, 3) 14.07, (128, 64, 8, 3) 14.41,
# (64, 64, 4, 4) 16.81; torch's bmm/baddbmm iteration 19.13 ms). 9th session, TMA loads, the 3 wide stacks
# (bench/train_ns.py, fastest of 3 rounds): (128, 64, 4, 3) 12.59 ms, (128, 64, 4, 4) 13.33, (128, 128, 4, 3)
# 13.44, (128, 128, 8, 3) 13.48; TMA stores too 12.97; persistent 1 / SM 13.83, 2 / SM 12.37 (within noise)
DEFAULT_CONFIG = (128, 64, 4, 3)
SYM_TMA = True  # H200, qwen3-0.6b's 3 wide stacks: pointer loads 13.40 -> 12.59 ms (another run 12.6 -> 11.4)
SYM_TMA_OUT = False
SYM_PERSIST = 0
NSQ_MODES = {"poly": 1, "gram": 2, "rsqrt": 3}  # how norm_sq scales the product: see sym_gram


@triton.jit
def _sym_tile(
    X, Y, S, OUT, TI, TJ, NSQ, t, b, R, K,
    sxb, sxr, sxk, syb, syr, syk, ssb, ssr, ssc, sob, sor, soc,
    alpha, beta, diag, eps_sq, nsq_p,
    NSQ_MODE: tl.constexpr, NSQ_PB: tl.constexpr, HAS_S: tl.constexpr, HAS_DIAG: tl.constexpr,
    EVEN: tl.constexpr, UPCAST: tl.constexpr, RTNE: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
    TMA_OUT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """One (BM, BM) tile t of matrix b: rows of X's block TI[t], columns of Y's block TJ[t]."""
    ti = tl.load(TI + t)  # tile row <= tile column: the upper triangle
    tj = tl.load(TJ + t)
    b64 = b.to(tl.int64)
    rows = ti * BM + tl.arange(0, BM)
    cols = tj * BM + tl.arange(0, BM)
    acc = tl.zeros((BM, BM), dtype=tl.float32)
    if (
        TMA
    ):  # X, Y: descriptors over the (n * R, K) rows; rows past R belong to the next matrix (masked below)
        ra = b * R + ti * BM
        rb = b * R + tj * BM
        for k0 in range(0, K, BK):
            a = X.load([ra, k0])  # (BM, BK), zeros past K
            bb = Y.load([rb, k0])  # (BM, BK)
            if UPCAST:
                a = a.to(tl.float32)
                bb = bb.to(tl.float32)
            acc = tl.dot(a, tl.trans(bb), acc, input_precision=PREC)
    else:
        ks = tl.arange(0, BK)
        xa = X + b64 * sxb + rows[:, None] * sxr + ks[None, :] * sxk  # (BM, BK) rows of block ti
        xb = (
            Y + b64 * syb + cols[:, None] * syr + ks[None, :] * syk
        )  # (BM, BK) rows of block tj (Y = X or not)
        for k0 in range(0, K, BK):
            if EVEN:
                a = tl.load(xa)
                bb = tl.load(xb)
            else:
                km = (k0 + ks) < K
                a = tl.load(xa, mask=(rows[:, None] < R) & km[None, :], other=0.0)
                bb = tl.load(xb, mask=(cols[:, None] < R) & km[None, :], other=0.0)
            if UPCAST:  # the interpreter's dot reads bf16 as integers
                a = a.to(tl.float32)
                bb = bb.to(tl.float32)
            acc = tl.dot(a, tl.trans(bb), acc, input_precision=PREC)
            xa += BK * sxk
            xb += BK * syk
    if (
        NSQ_MODE != 0
    ):  # n^2 = |X_b|_F^2 = the sum of NSQ[b, :nsq_p] (one value, or the momentum pass's partials)
        po = tl.arange(0, NSQ_PB)
        nsq = tl.sum(tl.load(NSQ + b64 * nsq_p + po, mask=po < nsq_p, other=0.0).to(tl.float32), axis=0)
        inv = 1.0 / tl.maximum(nsq, eps_sq)
        inv_n = tl.sqrt(inv)
        if NSQ_MODE == 1:  # "poly": X = S = G = raw X X^T: (alpha A^2 + beta A + diag I) / n with A = G / n^2
            alpha = alpha * inv * inv * inv_n
            beta = beta * inv * inv_n
            diag = diag * inv_n
        elif NSQ_MODE == 2:  # "gram": alpha X X^T / n^2
            alpha = alpha * inv
        else:  # "rsqrt": alpha X Y^T / n
            alpha = alpha * inv_n
    acc = acc * alpha
    inside = (rows[:, None] < R) & (cols[None, :] < R)
    if HAS_S:
        s = tl.load(S + b64 * ssb + rows[:, None] * ssr + cols[None, :] * ssc, mask=inside, other=0.0)
        acc += beta * s.to(tl.float32)
    if HAS_DIAG:
        acc += tl.where(rows[:, None] == cols[None, :], diag, 0.0)
    if UPCAST and RTNE:  # the interpreter truncates fp32 -> bf16; the GPU rounds to nearest even: round here
        bits = acc.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        acc = bits.to(tl.float32, bitcast=True)
    if TMA_OUT:  # OUT: a descriptor over (n, R, R) with (1, BM, BM) blocks (clipped at R)
        out = acc.to(OUT.dtype)
        OUT.store([b, ti * BM, tj * BM], out.reshape(1, BM, BM))
        if ti != tj:
            OUT.store([b, tj * BM, ti * BM], tl.trans(out).reshape(1, BM, BM))
    else:
        out = acc.to(OUT.dtype.element_ty)
        tl.store(OUT + b64 * sob + rows[:, None] * sor + cols[None, :] * soc, out, mask=inside)
        if ti != tj:  # the mirrored tile below the diagonal (transposed in registers: coalesced stores)
            mirror = OUT + b64 * sob + cols[:, None] * sor + rows[None, :] * soc
            tl.store(mirror, tl.trans(out), mask=(cols[:, None] < R) & (rows[None, :] < R))


@triton.jit
def _sym_gram_kernel(
    X, Y, S, OUT, TI, TJ, NSQ, R, K, NT, NMAT,
    sxb, sxr, sxk, syb, syr, syk, ssb, ssr, ssc, sob, sor, soc,
    alpha, beta, diag, eps_sq, nsq_p,
    NSQ_MODE: tl.constexpr, NSQ_PB: tl.constexpr, HAS_S: tl.constexpr, HAS_DIAG: tl.constexpr,
    EVEN: tl.constexpr, UPCAST: tl.constexpr, RTNE: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
    TMA_OUT: tl.constexpr, PERSIST: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # grid (NT tiles, NMAT matrices), or PERSIST: (programs,) each looping over tiles (matrix-major order)
    if PERSIST:
        for w in tl.range(tl.program_id(0), NT * NMAT, tl.num_programs(0)):
            _sym_tile(
                X, Y, S, OUT, TI, TJ, NSQ, w % NT, w // NT, R, K,
                sxb, sxr, sxk, syb, syr, syk, ssb, ssr, ssc, sob, sor, soc, alpha, beta, diag, eps_sq, nsq_p,
                NSQ_MODE, NSQ_PB, HAS_S, HAS_DIAG, EVEN, UPCAST, RTNE, PREC, TMA, TMA_OUT, BM, BK,
            )  # fmt: skip
    else:
        _sym_tile(
            X, Y, S, OUT, TI, TJ, NSQ, tl.program_id(0), tl.program_id(1), R, K,
            sxb, sxr, sxk, syb, syr, syk, ssb, ssr, ssc, sob, sor, soc, alpha, beta, diag, eps_sq, nsq_p,
            NSQ_MODE, NSQ_PB, HAS_S, HAS_DIAG, EVEN, UPCAST, RTNE, PREC, TMA, TMA_OUT, BM, BK,
        )  # fmt: skip


_TILES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _tiles(t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile row, tile column) index lists of the upper triangle of a t x t tile grid, cached per device."""
    key = (t, str(device))
    if key not in _TILES:
        ij = [(i, j) for i in range(t) for j in range(i, t)]
        ti = torch.tensor([i for i, _ in ij], dtype=torch.int32, device=device)
        tj = torch.tensor([j for _, j in ij], dtype=torch.int32, device=device)
        _TILES[key] = (ti, tj)
    return _TILES[key]


@functools.cache
def _num_sms(device: str) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.startswith("cuda") else 4


def _tma_ok(t: torch.Tensor) -> bool:
    """A (n, r, k) stack a 2-D descriptor over its (n * r, k) rows can read: unit stride along k, rows packed,
    16-byte aligned base and row stride."""
    n, r, k = t.shape
    es = t.element_size()
    return (
        t.stride(2) == 1 and (n == 1 or t.stride(0) == r * t.stride(1)) and (t.stride(1) * es) % 16 == 0
        and t.data_ptr() % 16 == 0 and k * es >= 16
    )  # fmt: skip


def sym_gram(
    x: torch.Tensor,  # (n, r, k) or (r, k), any strides
    alpha: float = 1.0,
    s: torch.Tensor | None = None,  # (n, r, r) like out, symmetric
    beta: float = 0.0,
    diag: float = 0.0,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
    norm_sq: torch.Tensor | None = None,  # (n,) or (n, p) fp32: see below
    eps: float = 1e-7,
    y: torch.Tensor | None = None,  # (n, r, k) like x: alpha * x y^T instead (must be symmetric)
    nsq_mode: str = "poly",
) -> torch.Tensor:
    """alpha * x x^T (+ beta * s) (+ diag * I) per matrix of the batch; symmetric, upper tiles computed once.

    With ``y``: alpha * x y^T (...), for products known to be symmetric, e.g. of two commuting symmetric
    matrices (polynomials of one Gram matrix: ``newton_schulz_gram``); only its upper tiles are computed.

    ``norm_sq`` (n,) = |X_n|_F^2 of the iteration's raw input X (or (n, p) partial sums of it, e.g. from the
    momentum pass), applied per ``nsq_mode``: "poly" (``x = s = X X^T`` of the unnormalized X): Newton-Schulz's
    first polynomial of the normalized A = X X^T / norm_sq, divided by |X_n|: (alpha A^2 + beta A + diag I) / |X|
    (times the raw X it is the first step of the normalized iteration: no pass over X to normalize it);
    "gram": alpha x x^T / norm_sq; "rsqrt": alpha x y^T / |X_n| (every scale clamped at eps)."""
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
        s = s.unsqueeze(0) if s is not None else None
    if x.dim() != 3:
        raise ValueError(f"sym_gram needs (n, r, k) or (r, k), got shape {tuple(x.shape)}")
    n, r, k = x.shape
    if s is not None and s.shape != (n, r, r):
        raise ValueError(f"sym_gram: s must be {(n, r, r)}, got {tuple(s.shape)}")
    y = x if y is None else (y.unsqueeze(0) if squeeze else y)
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(
            f"sym_gram: y must be like x {tuple(x.shape)} {x.dtype}, got {tuple(y.shape)} {y.dtype}"
        )
    if nsq_mode not in NSQ_MODES:
        raise ValueError(f"sym_gram: nsq_mode must be one of 'poly', 'gram', 'rsqrt', got {nsq_mode!r}")
    check_device(x, y, *(t for t in (s, out, norm_sq) if t is not None))
    if out is None:
        out = torch.empty((n, r, r), dtype=x.dtype, device=x.device)
    elif squeeze:
        out = out.unsqueeze(0)
    if norm_sq is not None:
        norm_sq = norm_sq.reshape(n, -1).contiguous()
        if norm_sq.dtype != torch.float32:
            norm_sq = norm_sq.float()
    bm, bk, warps, stages = config or DEFAULT_CONFIG
    if r <= 64 and config is None:
        bm, warps = max(16, triton.next_power_of_2(r)), 4
    ti, tj = _tiles(triton.cdiv(r, bm), x.device)
    sv = s if s is not None else out
    tma = bool(SYM_TMA) and _tma_ok(x) and _tma_ok(y)
    tma_out = tma and bool(SYM_TMA_OUT) and out.stride(2) == 1 and _tma_ok(out)
    xa, ya, oa = x, y, out
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        xa = TensorDescriptor.from_tensor(x.reshape(n * r, k), [bm, bk])
        ya = xa if y is x else TensorDescriptor.from_tensor(y.reshape(n * r, k), [bm, bk])
        if tma_out:
            oa = TensorDescriptor.from_tensor(out, [1, bm, bm])
    nt = ti.numel()
    persist = int(SYM_PERSIST)
    grid = (min(nt * n, persist * _num_sms(str(x.device))),) if persist else (nt, n)
    if n and r:
        _sym_gram_kernel[grid](
            xa, ya, sv, oa, ti, tj, norm_sq if norm_sq is not None else ti, r, k, nt, n,
            x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
            sv.stride(0), sv.stride(1), sv.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            float(alpha), float(beta), float(diag), float(eps) ** 2,
            norm_sq.shape[1] if norm_sq is not None else 1,
            NSQ_MODE=NSQ_MODES[nsq_mode] if norm_sq is not None else 0,
            NSQ_PB=triton.next_power_of_2(norm_sq.shape[1]) if norm_sq is not None else 1,
            HAS_S=s is not None and beta != 0.0,
            HAS_DIAG=diag != 0.0 or (norm_sq is not None and nsq_mode == "poly"),
            EVEN=r % bm == 0 and k % bk == 0,
            UPCAST=interpreting(), RTNE=out.dtype == torch.bfloat16, PREC="ieee" if x.dtype == torch.float32 else "tf32",
            TMA=tma, TMA_OUT=tma_out, PERSIST=persist > 0,
            BM=bm, BK=bk, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return out.squeeze(0) if squeeze else out


def _total(norm_sq: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """(n, 1, 1) fp32 |X_n|_F^2 from (n,) values or (n, p) partial sums, clamped at eps^2."""
    return norm_sq.reshape(n, -1).float().sum(-1).clamp(min=eps * eps).view(n, 1, 1)


def newton_schulz_sym(
    x: torch.Tensor,  # (n, r, c) or (r, c) bf16, r <= c (the wide orientation), not normalized
    steps: int,
    coefficients: tuple[float, float, float],
    eps: float = 1e-7,
    norm_sq: torch.Tensor | None = None,  # (n,) or (n, p) fp32: |X_n|_F^2 (partial sums), if known
) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration X <- (a I + b A + c A^2) X, A = X X^T, from the raw X, with the
    symmetric products on ``sym_gram``. Step 1: G = X X^T, |X|_F^2 = trace(G) (or ``norm_sq``); the kernel
    scales A = G / |X|^2 and divides the polynomial by |X| (the normalization without a pass over X)."""
    a, b, c = coefficients
    if steps <= 0:
        return x
    gram = sym_gram(x)
    if norm_sq is None:
        norm_sq = gram.diagonal(dim1=-2, dim2=-1).float().sum(-1).reshape(-1)
    poly = sym_gram(gram, alpha=c, s=gram, beta=b, diag=a, norm_sq=norm_sq, eps=eps)
    x = torch.matmul(poly, x)
    for _ in range(steps - 1):
        gram = sym_gram(x)  # A = X X^T
        poly = sym_gram(gram, alpha=c, s=gram, beta=b, diag=a)  # c A A^T + b A + a I
        x = torch.matmul(poly, x)
    return x


def newton_schulz_gram(
    x: torch.Tensor,  # (n, r, c) bf16, r <= c (the wide orientation), not normalized
    steps: int,
    coefficients: tuple[float, float, float],
    eps: float = 1e-7,
    restarts: tuple[int, ...] = (2,),
    norm_sq: torch.Tensor | None = None,  # (n,) or (n, p) fp32: |X_n|_F^2 (partial sums), if known
    fold: bool = True,
) -> torch.Tensor:
    """The same iteration on the (r, r) Gram matrix: Gram Newton-Schulz (Dao AI Lab, 2026; DeepSpeed's Muon).

    With P = a I + b R + c R^2 (R = X X^T), X <- P X turns R into P R P (P commutes with R), so between
    restarts the iterations only update R and accumulate Q = P_0 P_1 ...; X is read again only at a restart
    (X <- Q X, R recomputed from it) and at the end (X <- Q X): per wide (r, 3r) matrix ~2/3 of the FLOPs.
    R, P and Q are fp16 (all bounded once A is normalized: more mantissa than bf16) and every r x r product
    is symmetric (polynomials of one R), so each runs on ``sym_gram``'s upper tiles; the restart after
    iteration 2 keeps R's rounding from accumulating (the published fix for half precision). Against an
    fp64 iteration its error is below the bf16 iteration's (tests/kernels/test_newton_schulz.py).
    ``fold``: the normalization and casts ride on the products' epilogues (R = X X^T / |X|^2 written in fp16,
    the Q read by X's products written in bf16, scaled by 1 / |X| while X is the raw input): no elementwise
    pass; otherwise an fp32 X X^T, a division and casts as separate passes (the earlier path, for A/B)."""
    a, b, c = coefficients
    if steps <= 0:
        return x
    n, r, _ = x.shape
    if not fold:
        return _gram_unfolded(x, steps, coefficients, eps, restarts)
    if norm_sq is None:
        norm_sq = torch.linalg.vector_norm(x, dim=(1, 2), dtype=torch.float32).square()  # (n,)
    half = torch.empty((n, r, r), dtype=torch.float16, device=x.device)
    gram = sym_gram(x, out=half, norm_sq=norm_sq, nsq_mode="gram", eps=eps)  # R = X X^T / |X|^2
    raw = True  # Q is applied to the raw X: scaled by 1 / |X|
    q: torch.Tensor | None = None
    for i in range(steps):
        if i in restarts and q is not None:
            x = torch.matmul(q, x)  # X <- Q X (q in bf16, scaled)
            gram, q, raw = sym_gram(x, out=torch.empty_like(gram)), None, False
        poly = sym_gram(gram, alpha=c, s=gram, beta=b, diag=a)  # P = a I + b R + c R^2
        end = i + 1 == steps or i + 1 in restarts  # Q is multiplied into X next
        if q is None:
            q = _scaled(poly, _total(norm_sq, n, eps).rsqrt() if raw else None, x.dtype) if end else poly
        else:
            dt = x.dtype if end else torch.float16
            nsq = norm_sq if end and raw else None
            q = sym_gram(q, y=poly, out=torch.empty((n, r, r), dtype=dt, device=x.device), norm_sq=nsq,
                         nsq_mode="rsqrt", eps=eps)  # Q P (/ |X|)  # fmt: skip
        if i + 1 < steps and i + 1 not in restarts:
            gram = sym_gram(poly, y=sym_gram(gram, y=poly))  # P (R P)
    assert q is not None
    return torch.matmul(q, x)


def _gram_unfolded(x, steps, coefficients, eps, restarts) -> torch.Tensor:
    """``newton_schulz_gram`` with its normalization and casts as torch passes (``fold=False``)."""
    a, b, c = coefficients
    n, r, _ = x.shape
    g = sym_gram(x, out=torch.empty((n, r, r), dtype=torch.float32, device=x.device))
    norm_sq = g.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=eps * eps).view(-1, 1, 1)
    gram = torch.div(g, norm_sq, out=torch.empty((n, r, r), dtype=torch.float16, device=x.device))  # R
    scale: torch.Tensor | None = norm_sq.rsqrt()  # Q applies to the raw X: Q / |X|
    q: torch.Tensor | None = None
    for i in range(steps):
        if i in restarts and q is not None:
            x = torch.matmul(_scaled(q, scale, x.dtype), x)  # X <- Q X
            gram, q, scale = sym_gram(x, out=torch.empty_like(gram)), None, None
        poly = sym_gram(gram, alpha=c, s=gram, beta=b, diag=a)  # P = a I + b R + c R^2
        q = poly if q is None else sym_gram(q, y=poly)  # Q P
        if i + 1 < steps and i + 1 not in restarts:
            gram = sym_gram(poly, y=sym_gram(gram, y=poly))  # P (R P)
    assert q is not None
    return torch.matmul(_scaled(q, scale, x.dtype), x)


def _scaled(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """q * scale (fp32 math) in ``dtype``: one pass."""
    if scale is None:
        return q.to(dtype)
    return torch.mul(q, scale, out=torch.empty(q.shape, dtype=dtype, device=q.device))


def sym_gram_ref(
    x: torch.Tensor, alpha: float = 1.0, s: torch.Tensor | None = None, beta: float = 0.0, diag: float = 0.0
) -> torch.Tensor:
    """The same in torch ops (fp32 math, result in x's dtype): the test reference."""
    xf = x.float()
    y = alpha * (xf @ xf.mT)
    if s is not None and beta != 0.0:
        y = y + beta * s.float()
    if diag != 0.0:
        y = y + diag * torch.eye(x.shape[-2], device=x.device)
    return y.to(x.dtype)
