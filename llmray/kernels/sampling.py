"""Temperature sampling in one pass over the logits: the Gumbel-max trick, noise drawn in the kernel.

token = argmax_v (logits[v] / T + g_v), g_v = -log(-log u_v), u_v ~ U(0, 1) — the same distribution as
softmax(logits / T) (and as the exponential race argmax p_v / E_v, E_v = -log u_v). One program per row
streams the row once, keeping a running (max, argmax) per lane; the uniforms come from Philox
(``tl.rand(seed, row * V + v)``), so a step needs no noise tensor, no softmax and no host round trip.
Rows with ``noise = 0`` take the plain argmax (greedy rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["seed"])  # a new seed every call: one compiled variant for all of them
def _gumbel_argmax_kernel(
    logits_ptr,
    inv_temp_ptr,  # (B,) fp32: 1 / temperature
    noise_ptr,  # (B,) fp32: 1 = sample, 0 = argmax
    out_ptr,  # (B,) int64
    seeds_ptr,  # (B,) int64: each row's own Philox seed (ROW_SEEDS)
    seed,
    stride_row,
    V,
    ROW_SEEDS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    inv_t = tl.load(inv_temp_ptr + row)
    noise = tl.load(noise_ptr + row)
    if ROW_SEEDS:  # the row's noise depends on its own seed only (seeded requests: batch-independent)
        s = tl.load(seeds_ptr + row)
        first = 0
    else:
        s = seed
        first = row * V
    cols = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        x = tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32)
        u = tl.rand(s, first + idx)
        u = tl.maximum(u, 1e-20)  # (0, 1): no log(0)
        g = -tl.log(-tl.log(u))
        score = tl.where(mask, x * inv_t + g * noise, float("-inf"))
        take = score > best
        best = tl.where(take, score, best)
        best_idx = tl.where(take, idx, best_idx)
    top = tl.max(best, 0)
    pick = tl.min(tl.where(best == top, best_idx, V), 0)
    tl.store(out_ptr + row, pick.to(tl.int64))


def gumbel_argmax(
    logits: torch.Tensor,
    inv_temp: torch.Tensor,
    noise: torch.Tensor,
    seed: int,
    row_seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled token per row of logits (B, V) (any float dtype, unit stride along V); inv_temp, noise (B,)
    fp32 on the same device; seed in [0, 2**31). ``row_seeds`` (B,) int64 in [0, 2**31): each row draws
    from its own seed instead (``seed`` unused). Returns (B,) int64."""
    bsz, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(bsz, dtype=torch.int64, device=logits.device)
    if bsz:
        _gumbel_argmax_kernel[(bsz,)](
            logits,
            inv_temp,
            noise,
            out,
            row_seeds if row_seeds is not None else out,
            seed,
            logits.stride(0),
            vocab,
            ROW_SEEDS=row_seeds is not None,
            BLOCK=4096,
            num_warps=8,
        )
    return out
