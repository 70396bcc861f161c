"""A plain step's sampling prepared ahead of its call (``Sampler.prepare``): the kernel arguments of a step
whose rows only set a temperature, and those rows' parameters kept while the same sequences sample."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from llmray.engine.sequence import Sequence


@dataclass
class Plan:
    """A plain step's sampling prepared ahead (``Sampler.prepare``): its kernel arguments, on the device."""

    seqs: list[Sequence]
    greedy: bool  # every row greedy: the argmax
    rows: torch.Tensor | None = None  # (2, B) fp32: 1 / temperature, noise on/off
    seeds: torch.Tensor | None = None  # (B,) int64: per-row Philox seeds (seeded rows in the step)
    seed: int = 0


class Rows:
    """A plain step's per-row sampling parameters, kept while the same sequences sample (``Sampler.prepare``)."""

    def __init__(self, key: tuple, seqs: list[Sequence], greedy: bool) -> None:
        self.key, self.seqs, self.greedy = key, seqs, greedy  # (seqs kept: the key's ids stay theirs)
        self.params: torch.Tensor | None = None  # (2, B) fp32 on the device: 1 / temperature, noise on/off
        self.row_terms = np.zeros(0, dtype=np.int64)  # (B,) each row's part of an unseeded row's seed
        self.seeded = np.zeros(0, dtype=np.int64)  # the seeded rows
        self.seed_terms = np.zeros(0, dtype=np.int64)  # their requests' part of their seeds
        self.draws = np.zeros(0, dtype=np.int64)  # their draw counts (written back to ``seq_draws``)


def plain_rows(
    seqs: list[Sequence],
    key: tuple,
    seq_draws: dict[int, int],
    fused_seeded: bool,
    stage: Callable[[np.ndarray], torch.Tensor],
) -> Rows | None:
    """The kept parameters of ``seqs`` when every row is plain (temperature only), else None. ``stage``: a
    host array -> its device copy (queued, not waited for)."""
    temps: list[float] = []
    noise: list[float] = []
    seeded: list[int] = []
    for i, s in enumerate(seqs):
        p = s.sampling_params
        if (
            p.logprobs is not None
            or p.presence_penalty != 0.0
            or p.frequency_penalty != 0.0
            or p.repetition_penalty != 1.0
            or p.top_k > 0
            or p.top_p < 1.0
            or p.min_p > 0.0
            or p.min_tokens
        ):
            return None
        if p.temperature < 1e-5:  # SamplingParams.greedy
            temps.append(1.0)
            noise.append(0.0)
        else:
            temps.append(1.0 / p.temperature)
            noise.append(1.0)
            if p.seed is not None:
                seeded.append(i)
    if seeded and not fused_seeded:
        return None
    rows = Rows(key, seqs, greedy=not any(noise))
    if not rows.greedy:  # (a device tensor of its own, read by every step of these rows)
        rows.params = stage(np.asarray([temps, noise], dtype=np.float32))
    m = 2**31 - 1
    rows.row_terms = (np.arange(len(seqs), dtype=np.int64) * 1_000_003 + 1) % m
    rows.seeded = np.asarray(seeded, dtype=np.int64)
    rows.seed_terms = np.asarray(
        [(int(seqs[i].sampling_params.seed or 0) * 1_000_003 + 12_345) % m for i in seeded], dtype=np.int64
    )
    rows.draws = np.asarray([seq_draws.get(seqs[i].seq_id, 0) for i in seeded], dtype=np.int64)
    return rows
