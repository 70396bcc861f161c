"""Grammar masks on the logits in one pass: -inf wherever a row's token bitmask has a 0 bit, in place.

A constrained-decoding bitmask is int32 (R, ceil(V/32)): bit ``t % 32`` of word ``t // 32`` set = token ``t``
allowed. ``apply_token_bitmask_(logits, bitmask, rows)`` masks ``logits[rows[i]]`` with ``bitmask[i]`` in the
logits' own dtype: each program reads a block of one row's logits and the block's words (1/32 of the bytes),
so the mask costs one read and write of the constrained rows only (no fp32 copy, no 32x expanded mask).
``rows`` None: bitmask row i masks logits row i. The torch version (``apply_token_bitmask_torch``) is the same
result for CPU and for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _token_bitmask_kernel(
    logits_ptr,
    bitmask_ptr,  # (R, W) int32
    rows_ptr,  # (R,) int32: the logits row of each bitmask row (when HAS_ROWS)
    stride_logits,
    stride_mask,
    V,
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    blk = tl.program_id(1)
    row = tl.load(rows_ptr + r) if HAS_ROWS else r
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    inside = idx < V
    words = tl.load(bitmask_ptr + r.to(tl.int64) * stride_mask + idx // 32, mask=inside, other=-1)
    banned = ((words >> (idx % 32)) & 1) == 0
    ptr = logits_ptr + row.to(tl.int64) * stride_logits + idx
    tl.store(ptr, tl.full([BLOCK], float("-inf"), logits_ptr.dtype.element_ty), mask=inside & banned)


# tokens per program (16 per thread: BLOCK // 512 warps); bench/structured_bitmask.py times the choices: on an
# H200, 128 of 256 bf16 rows x 151,936 tokens took 29.8 us at 2048, 76.9 at 4096, 31.2 at 8192
# (bench/results/structured_bitmask.json)
BLOCK = 2048


def apply_token_bitmask_(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None, block: int | None = None
) -> torch.Tensor:
    """In place on logits (B, V) (unit stride along V), CUDA: ``logits[rows[i], t] = -inf`` where bit t of
    ``bitmask[i]`` (int32 (R, ceil(V/32)), contiguous) is 0; ``rows`` int32/int64 (R,) or None (R = B);
    ``block``: tokens per program (a power of two >= 512; None: ``BLOCK``). Returns logits."""
    bsz, vocab = logits.shape
    n = bitmask.shape[0]
    assert logits.stride(1) == 1 and bitmask.is_contiguous() and bitmask.dtype == torch.int32
    assert bitmask.shape[1] * 32 >= vocab, "a bitmask word per 32 tokens"
    assert rows is not None or n == bsz, "without rows, one bitmask row per logits row"
    if n == 0:
        return logits
    block = block or BLOCK
    grid = (n, triton.cdiv(vocab, block))
    rows_arg = rows if rows is not None else bitmask  # (unused when HAS_ROWS is False)
    _token_bitmask_kernel[grid](
        logits,
        bitmask,
        rows_arg,
        logits.stride(0),
        bitmask.stride(0),
        vocab,
        HAS_ROWS=rows is not None,
        BLOCK=block,
        num_warps=max(1, block // 512),
    )
    return logits


def apply_token_bitmask_torch(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """The same masking with torch ops (out of place): the reference and the CPU path."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab].bool()
    if rows is None:
        return logits.masked_fill(~allowed, float("-inf"))
    out = logits.clone()
    idx = rows.long()
    out[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
    return out


@triton.jit(do_not_specialize=["target", "max_iters"])
def _wait_flag_kernel(flag_ptr, target, max_iters, late_ptr):
    # one program polls the flag (volatile: from L2, where the copy engine's write lands, or over the bus from
    # pinned host memory) until it reaches ``target``; past ``max_iters`` polls it gives up and counts that in
    # ``late_ptr`` (no hang, ever)
    i = 0
    v = tl.load(flag_ptr, volatile=True)
    while (v < target) & (i < max_iters):
        v = tl.load(flag_ptr, volatile=True)
        i += 1
    if v < target:
        tl.atomic_add(late_ptr, 1)


def wait_flag(flag: torch.Tensor, target: int, late: torch.Tensor, max_iters: int = 2_000_000) -> None:
    """Queue on the current stream a wait until ``flag`` (int32 (1,), on the device, or in pinned host memory:
    the device reads it there) holds at least ``target``: the kernels queued after it run once another stream
    or a host thread has written the flag. It gives up after ``max_iters`` polls (about a second or more),
    adding 1 to ``late`` (int32 (1,), device)."""
    _wait_flag_kernel[(1,)](flag, target, max_iters, late, num_warps=1)
