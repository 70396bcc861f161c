"""Temperature sampling in one pass over the logits: the Gumbel-max trick, noise drawn in the kernel.

token = argmax_v (logits[v] / T + g_v), g_v = -log(-log u_v), u_v ~ U(0, 1) — the same distribution as
softmax(logits / T) (and as the exponential race argmax p_v / E_v, E_v = -log u_v). One program per row
streams the row once, keeping a running (max, argmax) per lane (a long row is split into parts, each program one part, and the parts' bests
merged by a second small kernel: the same token either way); the uniforms come from Philox, one draw
(``tl.randint4x``) for four neighbouring tokens (the draws were most of the kernel's time), so a step needs no noise tensor, no softmax and no host round trip.
Rows with ``noise = 0`` take the plain argmax (greedy rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float


@triton.jit(do_not_specialize=["seed"])  # a new seed every call: one compiled variant for all of them
def _gumbel_argmax_kernel(
    logits_ptr,
    inv_temp_ptr,  # (B,) fp32: 1 / temperature
    noise_ptr,  # (B,) fp32: 1 = sample, 0 = argmax
    out_ptr,  # (B,) int64 (SPLIT: (B, S) int32, each part's pick)
    score_ptr,  # SPLIT: (B, S) fp32, each part's best score
    seeds_ptr,  # (B,) int64: each row's own Philox seed (ROW_SEEDS)
    seed,
    stride_row,
    V,
    span,  # tokens per part (a multiple of BLOCK; V when not SPLIT)
    row_draws,  # Philox counters per row: ceil(V / BLOCK) * BLOCK / 4
    ROW_SEEDS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    part = tl.program_id(1)
    inv_t = tl.load(inv_temp_ptr + row)
    noise = tl.load(noise_ptr + row)
    if ROW_SEEDS:  # the row's noise depends on its own seed only (seeded requests: batch-independent)
        s = tl.load(seeds_ptr + row)
        first = 0
    else:
        s = seed
        first = row * row_draws
    lo = part * span
    hi = tl.minimum(lo + span, V)
    cols = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32) + lo
    base = logits_ptr + row.to(tl.int64) * stride_row
    quarter = tl.arange(0, BLOCK // 4)
    for start in range(lo, hi, BLOCK):
        idx = start + cols
        mask = idx < hi
        x = tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32)
        # one Philox draw, four uniforms: token start + 4i + k takes the k-th of draw first + start / 4 + i
        r0, r1, r2, r3 = tl.randint4x(s, first + start // 4 + quarter)
        r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
        u = tl.maximum(uint_to_uniform_float(r), 1e-20)  # (0, 1): no log(0)
        g = -tl.log(-tl.log(u))
        score = tl.where(mask, x * inv_t + g * noise, float("-inf"))
        take = score > best
        best = tl.where(take, score, best)
        best_idx = tl.where(take, idx, best_idx)
    top = tl.max(best, 0)
    pick = tl.min(tl.where(best == top, best_idx, V), 0)
    if SPLIT:
        nparts = tl.num_programs(1)
        tl.store(score_ptr + row * nparts + part, top)
        tl.store(out_ptr + row * nparts + part, pick)
    else:
        tl.store(out_ptr + row, pick.to(tl.int64))


@triton.jit
def _pick_kernel(score_ptr, part_ptr, out_ptr, V, S: tl.constexpr, PARTS: tl.constexpr):
    """Each row's token from its parts' (best score, pick): the lowest index among the best (as one pass)."""
    row = tl.program_id(0)
    k = tl.arange(0, PARTS)
    inside = k < S
    score = tl.load(score_ptr + row * S + k, mask=inside, other=float("-inf"))
    pick = tl.load(part_ptr + row * S + k, mask=inside, other=V)
    top = tl.max(score, 0)
    tl.store(out_ptr + row, tl.min(tl.where(inside & (score == top), pick, V), 0).to(tl.int64))


BLOCK = 4096
# the rows of a step are split into parts of whole blocks until about this many programs run (one program per
# row of a 256-row step left most of an H200 idle: 0.2 ms, on the critical path of a constrained step)
TARGET_PROGRAMS = 2048


def gumbel_argmax(
    logits: torch.Tensor,
    inv_temp: torch.Tensor,
    noise: torch.Tensor,
    seed: int,
    row_seeds: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Sampled token per row of logits (B, V) (any float dtype, unit stride along V); inv_temp, noise (B,)
    fp32 on the same device; seed in [0, 2**31). ``row_seeds`` (B,) int64 in [0, 2**31): each row draws
    from its own seed instead (``seed`` unused). ``splits``: programs per row (None: enough for
    ``TARGET_PROGRAMS`` in all); the tokens do not depend on it. Returns (B,) int64."""
    bsz, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(bsz, dtype=torch.int64, device=logits.device)
    if not bsz:
        return out
    blocks = triton.cdiv(vocab, BLOCK)
    if splits is None:
        splits = triton.cdiv(TARGET_PROGRAMS, bsz)
    per = triton.cdiv(blocks, max(1, min(splits, blocks)))  # blocks per part
    parts = triton.cdiv(blocks, per)
    seeds = row_seeds if row_seeds is not None else out
    if parts == 1:
        _gumbel_argmax_kernel[(bsz, 1)](
            logits, inv_temp, noise, out, out, seeds, seed, logits.stride(0), vocab, vocab, blocks * BLOCK // 4,
            ROW_SEEDS=row_seeds is not None, SPLIT=False, BLOCK=BLOCK, num_warps=8,
        )  # fmt: skip
        return out
    picks = torch.empty((bsz, parts), dtype=torch.int32, device=logits.device)
    scores = torch.empty((bsz, parts), dtype=torch.float32, device=logits.device)
    _gumbel_argmax_kernel[(bsz, parts)](
        logits, inv_temp, noise, picks, scores, seeds, seed, logits.stride(0), vocab, per * BLOCK, blocks * BLOCK // 4,
        ROW_SEEDS=row_seeds is not None, SPLIT=True, BLOCK=BLOCK, num_warps=8,
    )  # fmt: skip
    _pick_kernel[(bsz,)](scores, picks, out, vocab, S=parts, PARTS=triton.next_power_of_2(parts), num_warps=1)
    return out
