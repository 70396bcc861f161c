"""y = x @ w.T for a few rows (x (M, K) with M <= 64, w (N, K) row-major): a weight-streaming GEMM.

At M = 48-64 (a short prefill chunk, e.g. the suffix after a cached prefix) a projection is bound by reading
its weight once; cuBLAS's heuristics pick tiles that leave most of the H200's bandwidth unused for the
N = 1,024 outputs of o_proj / down_proj (0.7-0.9 TB/s measured). Here every program owns ``BLOCK_N``
output columns for all M rows and streams its weight rows along K (split over ``SPLIT_K`` programs whose
fp32 partials a second launch sums when the grid would otherwise not fill the chip). Forward only; fp32
accumulation, stored in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _skinny_kernel(
    X, W, Y, P, M, N, K, stride_x, stride_w, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_per = K // SPLIT_K  # (K % (SPLIT_K * BLOCK_K) == 0: checked by the wrapper)
    k0 = pid_k * k_per
    xp = X + rm[:, None] * stride_x + (k0 + rk)[None, :]
    wp = W + rn[:, None].to(tl.int64) * stride_w + (k0 + rk)[None, :]
    row_ok = rm[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _ in range(0, k_per, BLOCK_K):
        x = tl.load(xp, mask=row_ok, other=0.0)
        w = tl.load(wp)
        acc = tl.dot(x, tl.trans(w), acc)
        xp += BLOCK_K
        wp += BLOCK_K
    if SPLIT_K == 1:
        tl.store(Y + rm[:, None] * stride_y + rn[None, :], acc.to(Y.dtype.element_ty), mask=row_ok)
    else:
        tl.store(P + (pid_k * BLOCK_M + rm[:, None]) * N + rn[None, :], acc, mask=row_ok)


@triton.jit
def _sum_splits_kernel(
    P, Y, M, N, stride_y, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(P + (s * BLOCK_M + row) * N + cols, mask=ok, other=0.0)
    tl.store(Y + row * stride_y + cols, acc.to(Y.dtype.element_ty), mask=ok)


# (BLOCK_N, BLOCK_K, SPLIT_K, num_stages, num_warps)
DEFAULT_CONFIG = (16, 128, 1, 4, 4)


def skinny_fits(x: torch.Tensor, w: torch.Tensor, config: tuple = DEFAULT_CONFIG) -> bool:
    """Whether ``skinny_linear`` handles these shapes (else use F.linear)."""
    bn, bk, split = config[:3]
    m, k = x.shape
    n = w.shape[0]
    return 0 < m <= 64 and w.shape[1] == k and n % bn == 0 and k % (bk * split) == 0 and w.stride(1) == 1


def skinny_linear(
    x: torch.Tensor, w: torch.Tensor, config: tuple = DEFAULT_CONFIG, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x (M, K), w (N, K) -> x @ w.T (M, N) in x's dtype; M <= 64 (``skinny_fits``)."""
    bn, bk, split, stages, warps = config
    if not skinny_fits(x, w, config):
        raise ValueError(
            f"skinny_linear: unsupported shapes x {tuple(x.shape)}, w {tuple(w.shape)} for {config}"
        )
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = w.shape[0]
    block_m = max(16, triton.next_power_of_2(m))
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = torch.empty(split * block_m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    _skinny_kernel[(n // bn, split)](
        x, w, y, part, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_stages=stages, num_warps=warps,
    )  # fmt: skip
    if split > 1:
        block = min(1024, triton.next_power_of_2(n))
        _sum_splits_kernel[(m, triton.cdiv(n, block))](
            part, y, m, n, y.stride(0), BLOCK_M=block_m, SPLIT_K=split, BLOCK=block
        )
    return y
