"""Token sampling on the device for a batch of sequences, each with its own SamplingParams.

Order (as vLLM): penalties (repetition over prompt+output, frequency/presence over output), min_tokens
masking of EOS/stop tokens, the constrained-decoding bitmask (tokens whose bit is 0 get -inf), then greedy rows take the argmax; the other rows divide by temperature, apply
top-k, top-p and min-p, and draw with the exponential-race trick (argmax p / E, E ~ Exp(1)), which equals
sampling from p; on CUDA a step whose rows only set a temperature runs that as one fused Gumbel-max
kernel (``llmray.kernels.sampling``: one pass over the logits, Philox noise drawn in the kernel from a
per-call seed; a seeded request's row draws from its own Philox seed, made of its seed and how many tokens
it has drawn). Off the fused kernel a seeded request draws its noise from its own ``torch.Generator``. Either
way its tokens do not depend on what else shares the batch. Logprobs are of the raw model distribution (before any processing).
Nothing here syncs with the host; the engine reads the results once per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from llmray.engine.pinned import Stager
from llmray.engine.sampler_plan import Plan, Rows, plain_rows
from llmray.engine.sequence import Sequence

logger = logging.getLogger("llmray.engine")
_NP = {torch.float32: np.float32, torch.long: np.int64, torch.bool: np.bool_}
# a step's constrained-decoding masks: int32 (B, W) for every row, or (masks (C, W), sampling rows (C,) int32)
Bitmask = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # (B,) int64 on the device
    logprobs: torch.Tensor | None = None  # (B, 1 + n): the chosen token's logprob, then the top-n
    logprob_ids: torch.Tensor | None = None  # (B, 1 + n) token ids matching ``logprobs``


def _padded(rows: list[list[int]], pad: int) -> np.ndarray:
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.base_seed, self._draws = seed, 0  # the fused kernel's Philox seed: one per sampling call
        self.fused = True  # temperature-only steps through the fused kernel (CUDA)
        self.fused_seeded = (
            True  # ... seeded rows too, each on its own Philox seed (False: per-row generators)
        )
        self.kernel_mask = True  # masks applied in place by kernels/token_bitmask.py (CUDA)
        self.seq_generators: dict[int, torch.Generator] = {}  # seq_id -> its own generator (seeded requests)
        self.seq_draws: dict[int, int] = {}  # seq_id -> tokens drawn by the fused kernel (seeded requests)
        # per-step parameters go through persistent pinned arenas (a pageable copy or a fresh pinned
        # allocation would stall the host while the previous step runs: see pinned.py)
        self.stager = Stager(device)
        self._plan: Plan | None = None  # see prepare()
        self._rows: Rows | None = None  # ... and the rows it keeps
        self.plan_ahead = True  # False: prepare() does nothing (A/B runs)

    def release(self, seq: Sequence) -> None:
        self.seq_generators.pop(seq.seq_id, None)
        self.seq_draws.pop(seq.seq_id, None)

    def _tensor(self, values: list | tuple, dtype: torch.dtype) -> torch.Tensor:
        return self.stager.to_device(values, _NP[dtype])

    def _from_numpy(self, a: np.ndarray) -> torch.Tensor:
        return self.stager.to_device(a)

    def __call__(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        eos_token_id: int | None,
        bitmask: Bitmask | None = None,
    ) -> SamplerOutput:
        """logits (B, V) (model dtype or fp32), one row per sequence that samples this step; bitmask int32 (B, ceil(V/32)) on
        the device (bit t%32 of word t//32 = token t allowed) for steps with constrained rows."""
        plan, self._plan = self._plan, None
        if plan is not None and plan.seqs is not seqs:  # prepared for another call: unused
            self.stager.end_step()
            plan = None
        if plan is None:
            self._flush_draws()  # (the unprepared path reads and counts seq_draws itself)
            self.stager.begin_step()
        try:
            if plan is not None:
                return self._call_planned(logits, seqs, eos_token_id, bitmask, plan)
            return self._call(logits, seqs, eos_token_id, bitmask)
        finally:
            self.stager.end_step()

    def prepare(self, seqs: list[Sequence], eos_token_id: int | None) -> None:
        """Do the host work of the next call for ``seqs`` (the same list object) now: the runner calls this
        before it waits for a constrained step's masks, so that once they are filled only the mask copy and two
        kernels are left to queue. Only plain steps (every row temperature-only: no logprobs, penalties,
        min_tokens, top-k/p, min-p) on the fused CUDA kernel are prepared; any other step runs as usual. The
        rows' parameters are kept while the same sequences sample (``Rows``): a step then costs a few numpy
        operations, whatever the batch size."""
        if self._plan is not None:  # prepared and never used
            self._plan = None
            self.stager.end_step()
        if not (self.plan_ahead and self.fused and self.device.type == "cuda") or not seqs:
            return
        key = tuple(map(id, seqs))
        self.stager.begin_step()
        rows = self._rows
        if rows is None or rows.key != key:
            self._flush_draws()
            rows = self._rows = plain_rows(seqs, key, self.seq_draws, self.fused_seeded, self._from_numpy)
        if rows is None:
            self.stager.end_step()
            return
        if rows.greedy:
            self._plan = Plan(seqs, greedy=True)
            return
        m = 2**31 - 1
        step = (self.base_seed * 1_000_003 + (self._draws + 1) * 7_919) % m
        out = (step * 31 + rows.row_terms) % m  # the rows' seeds as _row_seeds() gives them
        if rows.seeded.size:
            out[rows.seeded] = (rows.seed_terms + rows.draws * 7_919) % m
            rows.draws += 1
        self._draws += 1
        self._plan = Plan(
            seqs,
            greedy=False,
            rows=rows.params,
            seeds=self._from_numpy(out) if rows.seeded.size else None,
            seed=(self.base_seed * 1_000_003 + self._draws * 7_919) % m,
        )

    def _flush_draws(self) -> None:
        """Write the kept rows' draw counts back to ``seq_draws`` (before any other path reads them)."""
        rows, self._rows = self._rows, None
        if rows is None or not rows.seeded.size:
            return
        for i, n in zip(rows.seeded.tolist(), rows.draws.tolist(), strict=True):
            seq = rows.seqs[i]
            if not seq.is_finished:  # (a finished one was released)
                self.seq_draws[seq.seq_id] = n

    def _call_planned(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        eos_token_id: int | None,
        bitmask: Bitmask | None,
        plan: Plan,
    ) -> SamplerOutput:
        from llmray.kernels.sampling import gumbel_argmax

        if bitmask is not None:
            logits = self._apply_bitmask(logits, bitmask)  # (in place: CUDA)
        if plan.greedy:
            return SamplerOutput(logits.argmax(dim=-1))
        assert plan.rows is not None, "a sampling plan carries its rows"
        try:
            return SamplerOutput(gumbel_argmax(logits, plan.rows[0], plan.rows[1], plan.seed, plan.seeds))
        except Exception as e:  # (a kernel that cannot compile here): the torch path from now on
            logger.warning("fused sampling kernel unavailable, using torch ops: %r", e)
            self.fused = False
            greedy = [s.sampling_params.temperature < 1e-5 for s in seqs]
            return SamplerOutput(self._sample(logits, seqs, greedy))

    def _call(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        eos_token_id: int | None,
        bitmask: Bitmask | None,
    ) -> SamplerOutput:
        params = [s.sampling_params for s in seqs]
        bsz, vocab = logits.shape
        # one pass over the rows for what this step needs (the per-step host cost)
        n_logprobs: int | None = None
        penalties = False
        greedy: list[bool] = []
        masks: list[tuple[int, int]] = []  # (row, token) masked to -inf before min_tokens
        for i, (s, p) in enumerate(zip(seqs, params, strict=True)):
            if p.logprobs is not None and (n_logprobs is None or p.logprobs > n_logprobs):
                n_logprobs = p.logprobs
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0:
                penalties = True
            if p.min_tokens and len(s.token_ids) - len(s.prompt_token_ids) < p.min_tokens:
                if eos_token_id is not None:
                    masks.append((i, eos_token_id))
                masks.extend((i, t) for t in p.stop_token_ids)
            greedy.append(p.temperature < 1e-5)  # SamplingParams.greedy
        if (
            n_logprobs is not None
            or penalties
            or masks
            or (bitmask is not None and not self._mask_in_place(logits))
        ):
            logits = logits.float()  # (argmax and sampling read model-dtype logits as they are)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if n_logprobs is not None else None

        if penalties:
            logits = self._apply_penalties(logits.clone(), seqs)
        if masks:
            rows, cols = zip(*masks, strict=True)
            logits = logits.index_put(
                (self._tensor(rows, torch.long), self._tensor(cols, torch.long)),
                torch.full((len(rows),), float("-inf"), device=self.device),
            )

        if bitmask is not None:
            logits = self._apply_bitmask(logits, bitmask)

        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, seqs, greedy)
        out = SamplerOutput(tokens)
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, tokens[:, None])
            ids = [tokens[:, None]]
            vals = [chosen]
            if n_logprobs:
                top = raw_logprobs.topk(min(n_logprobs, vocab), dim=-1)
                vals.append(top.values)
                ids.append(top.indices)
            out.logprobs, out.logprob_ids = torch.cat(vals, 1), torch.cat(ids, 1)
        return out

    def _mask_in_place(self, logits: torch.Tensor) -> bool:
        return self.kernel_mask and logits.is_cuda

    def _apply_bitmask(self, logits: torch.Tensor, bitmask: Bitmask) -> torch.Tensor:
        """-inf where a row's bit is 0. ``bitmask``: int32 (B, W) for every row, or (masks (C, W), rows (C,) int32)
        for the constrained rows only (the others are not masked). CUDA: in place, in the logits' dtype, one
        kernel (the step's own lm_head output or its fp32 copy; raw logprobs were taken before); else torch ops."""
        from llmray.kernels.token_bitmask import apply_token_bitmask_, apply_token_bitmask_torch

        masks, rows = bitmask if isinstance(bitmask, tuple) else (bitmask, None)
        if self._mask_in_place(logits):
            return apply_token_bitmask_(logits, masks, rows)
        return apply_token_bitmask_torch(logits, masks, rows)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        bsz, vocab = logits.shape
        params = [s.sampling_params for s in seqs]
        outputs = self._from_numpy(_padded([s.output_token_ids for s in seqs], vocab))
        counts = torch.zeros(bsz, vocab + 1, device=self.device)
        counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=counts.dtype))
        counts = counts[:, :vocab]
        freq = self._tensor([p.frequency_penalty for p in params], torch.float32)[:, None]
        pres = self._tensor([p.presence_penalty for p in params], torch.float32)[:, None]
        logits = logits - freq * counts - pres * (counts > 0).float()
        rep = self._tensor([p.repetition_penalty for p in params], torch.float32)[:, None]
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = torch.zeros(bsz, vocab + 1, dtype=torch.bool, device=self.device)
            everything = self._from_numpy(_padded([s.token_ids for s in seqs], vocab))
            seen.scatter_(1, everything, True)
            seen = seen[:, :vocab]
            penalized = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalized, logits)
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        params = [s.sampling_params for s in seqs]
        temps, seeded = [], []
        top_k_p = min_p_on = False
        for i, (g, p) in enumerate(zip(greedy, params, strict=True)):
            temps.append(1.0 if g else p.temperature)
            if p.top_k > 0 or p.top_p < 1.0:
                top_k_p = True
            if p.min_p > 0.0:
                min_p_on = True
            if p.seed is not None and not g:
                seeded.append(i)
        if (
            self.fused
            and self.device.type == "cuda"
            and not (top_k_p or min_p_on or (seeded and not self.fused_seeded))
        ):
            # the common case (temperature only): one kernel streams the logits once (Gumbel-max with
            # in-kernel Philox noise) instead of scale, softmax, noise tensor, divide and argmax; with seeded
            # rows each row draws from its own Philox seed (request seed, draw count): no per-row loop
            try:
                return self._gumbel(logits, temps, greedy, self._row_seeds(seqs, seeded) if seeded else None)
            except Exception as e:  # (a kernel that cannot compile here): the torch path from now on
                logger.warning("fused sampling kernel unavailable, using torch ops: %r", e)
                self.fused = False
        scaled = logits / self._tensor(temps, torch.float32)[:, None]
        if top_k_p:
            scaled = self._top_k_top_p(scaled, params)
        probs = torch.softmax(scaled, dim=-1)
        if min_p_on:
            min_p = self._tensor([p.min_p for p in params], torch.float32)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i in seeded:
            seq = seqs[i]
            gen = self.seq_generators.get(seq.seq_id)
            if gen is None:
                seed = params[i].seed
                assert seed is not None, "seeded rows are the rows with a seed"
                gen = torch.Generator(device=self.device).manual_seed(seed)
                self.seq_generators[seq.seq_id] = gen
            noise[i].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        if not any(greedy):
            return sampled
        return torch.where(self._tensor(greedy, torch.bool), logits.argmax(dim=-1), sampled)

    def _row_seeds(self, seqs: list[Sequence], seeded: list[int]) -> list[int]:
        """One Philox seed per row for the fused kernel: a seeded request's from (its seed, how many tokens it
        has drawn), so its tokens do not depend on the batch; the other rows' from the step's draw and row."""
        step = (self.base_seed * 1_000_003 + (self._draws + 1) * 7_919) % (2**31 - 1)
        out = [(step * 31 + i * 1_000_003 + 1) % (2**31 - 1) for i in range(len(seqs))]
        for i in seeded:
            seq = seqs[i]
            n = self.seq_draws.get(seq.seq_id, 0)
            self.seq_draws[seq.seq_id] = n + 1
            seed = seq.sampling_params.seed
            assert seed is not None, "seeded rows are the rows with a seed"
            out[i] = (seed * 1_000_003 + n * 7_919 + 12_345) % (2**31 - 1)
        return out

    def _gumbel(
        self, logits: torch.Tensor, temps: list[float], greedy: list[bool], row_seeds: list[int] | None = None
    ) -> torch.Tensor:
        from llmray.kernels.sampling import gumbel_argmax

        rows = self._tensor([[1.0 / t for t in temps], [0.0 if g else 1.0 for g in greedy]], torch.float32)
        seeds = self._tensor(row_seeds, torch.long) if row_seeds is not None else None
        self._draws += 1
        seed = (self.base_seed * 1_000_003 + self._draws * 7_919) % (2**31 - 1)
        return gumbel_argmax(logits, rows[0], rows[1], seed, seeds)

    def _top_k_top_p(self, logits: torch.Tensor, params: list) -> torch.Tensor:
        vocab = logits.shape[1]
        k = self._tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], torch.long)
        top_p = self._tensor([p.top_p for p in params], torch.float32)
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
        sorted_p = torch.softmax(sorted_logits, dim=-1)
        # the mass before each token reaching top_p drops it; the most likely token always stays (a top_p
        # that underflows float32 to 0 would otherwise drop every token)
        drop = ((sorted_p.cumsum(dim=-1) - sorted_p) >= top_p[:, None]) & (ranks > 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
