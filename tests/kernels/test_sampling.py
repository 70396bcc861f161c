"""Fused Gumbel-max sampling kernel: greedy rows are the argmax, sampled rows follow softmax(logits / T).

CPU (Triton interpreter, a few rows: one program per row is slow there): argmax rows, the seed's
determinism. GPU (``-m gpu``): the sampled distribution over 20,000 rows.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmray.kernels.sampling import gumbel_argmax  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(rows: int, vocab: int, temp: float, greedy: int):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(vocab, generator=g) * 1.5
    logits = base.repeat(rows, 1)
    logits[:greedy] = torch.randn(greedy, vocab, generator=g)  # greedy rows with their own logits
    noise = torch.ones(rows)
    noise[:greedy] = 0.0
    inv = torch.full((rows,), 1.0 / temp)
    return base, logits.to(DEVICE), inv.to(DEVICE), noise.to(DEVICE)


def test_greedy_rows_take_the_argmax_and_a_seed_fixes_the_draws():
    _, logits, inv, noise = _case(rows=8, vocab=40, temp=1.0, greedy=3)
    out = gumbel_argmax(logits, inv, noise, seed=1234).cpu()
    assert out.dtype == torch.int64 and out.shape == (8,)
    assert torch.equal(out[:3], logits[:3].argmax(-1).cpu())
    assert ((out >= 0) & (out < 40)).all()
    assert torch.equal(out, gumbel_argmax(logits, inv, noise, seed=1234).cpu())
    draws = {tuple(gumbel_argmax(logits, inv, noise, seed=s).cpu()[3:].tolist()) for s in range(4)}
    assert len(draws) > 1  # other seeds, other tokens


@pytest.mark.gpu
@pytest.mark.parametrize("spread", [False, True])
def test_sampled_rows_follow_the_softmax_gpu(spread):
    """20,000 draws per token set; ``spread``: the six tokens sit at every position of a Philox draw's four
    uniforms, in other draws and blocks (-inf elsewhere), and the row is split over several programs."""
    base, logits, inv, noise = _case(rows=20_000, vocab=6, temp=0.7, greedy=0)
    if spread:
        where = torch.tensor([1, 2, 3, 4, 1030, 9001], device=DEVICE)
        wide = torch.full((logits.shape[0], 9100), float("-inf"), device=DEVICE)
        wide[:, where] = logits
        out = gumbel_argmax(wide.to(torch.bfloat16), inv, noise, seed=7)
        assert torch.isin(out, where).all()
        out = torch.searchsorted(where, out).cpu()
    else:
        out = gumbel_argmax(logits.to(torch.bfloat16), inv, noise, seed=7).cpu()
    freq = torch.bincount(out, minlength=6).float() / out.numel()
    expect = torch.softmax(base.to(torch.bfloat16).float() / 0.7, -1)
    assert (freq - expect).abs().max() < 0.015, (freq, expect)


def test_row_seeds_make_a_row_independent_of_its_batch():
    """Per-row Philox seeds (seeded requests): a row's draw depends on its own seed, not on its row or batch."""
    _, logits, inv, noise = _case(rows=4, vocab=40, temp=1.0, greedy=0)
    seeds = torch.tensor([11, 22, 33, 44], device=DEVICE)
    out = gumbel_argmax(logits, inv, noise, seed=0, row_seeds=seeds).cpu()
    alone = gumbel_argmax(logits[2:3], inv[2:3], noise[2:3], seed=99, row_seeds=seeds[2:3]).cpu()
    assert out[2] == alone[0]
    flipped = gumbel_argmax(logits.flip(0), inv, noise, seed=5, row_seeds=seeds.flip(0)).cpu()
    assert torch.equal(flipped.flip(0), out)  # the same logits rows (identical here) with the same seeds
    draws = {
        tuple(gumbel_argmax(logits, inv, noise, 0, torch.full((4,), s, device=DEVICE)).tolist())
        for s in range(6)
    }
    assert len(draws) > 1


def test_rows_split_into_parts_draw_the_same_tokens():
    """A row split over several programs (parts merged by a second kernel) draws exactly the unsplit token,
    ties included (the lowest index among the best), and a fully masked row gives token 0 either way."""
    _, logits, inv, noise = _case(rows=3, vocab=8_500, temp=1.0, greedy=1)
    logits[2, 8200:] = logits[2, 100]  # ties across parts: the first of them wins
    noise[2] = 0.0
    logits = torch.cat([logits, torch.full_like(logits[:1], float("-inf"))])
    inv, noise = torch.cat([inv, inv[:1]]), torch.cat([noise, noise[:1]])
    seeds = torch.tensor([5, 6, 7, 8], device=DEVICE)
    for row_seeds in (None, seeds):
        one = gumbel_argmax(logits, inv, noise, 3, row_seeds, splits=1).cpu()
        for splits in (2, None):
            assert torch.equal(gumbel_argmax(logits, inv, noise, 3, row_seeds, splits=splits).cpu(), one)
    assert one[0] == logits[0].argmax().item() and one[3] == 0
    assert one[2] == logits[2].argmax().item()
