"""Continuous batching in pure Python: a per-step token budget, decodes first, chunked prefill, preemption.

Each ``schedule()`` picks, for this step, how many new tokens each sequence computes:
1. running sequences that decode (one token each), oldest first;
2. running sequences still filling their prompt, a chunk that fits the remaining budget;
3. waiting sequences (new or preempted, oldest first) while the budget, the sequence cap and the free
   blocks allow, starting after their longest cached prefix.
When a running sequence needs a block and none is free, the newest running sequence not yet scheduled in
this step is preempted by recompute: its blocks are freed and it goes back to the front of the queue,
keeping its generated tokens (they are recomputed as part of its prompt when it resumes).
No torch here (tested on CPU with hypothesis).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from llmray.engine.block_manager import BlockManager, cdiv
from llmray.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens
    start: int  # = seq.num_computed_tokens when scheduled

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's end, so its last logits pick a new token."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Owns the waiting queue, the running list and the block manager."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # called before a waiting sequence is admitted; False leaves it waiting (its LoRA adapter has no
        # free device slot) and admission goes on with the sequences behind it
        self.admit: Callable[[Sequence], bool] | None = None

    # --- requests -------------------------------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ValueError if a request of this size could never run."""
        total = num_prompt_tokens + max_tokens
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"the prompt has {num_prompt_tokens} tokens, which fill the context window of "
                f"{self.max_model_len} tokens on their own; shorten the prompt"
            )
        if total > self.max_model_len:
            raise ValueError(
                f"the prompt has {num_prompt_tokens} tokens and max_tokens={max_tokens}: {total} tokens exceed "
                f"the context window of {self.max_model_len} tokens (lower max_tokens to at most "
                f"{self.max_model_len - num_prompt_tokens})"
            )
        bm = self.block_manager
        if cdiv(total, bm.block_size) > bm.num_blocks:
            raise ValueError(
                f"the prompt ({num_prompt_tokens} tokens) plus max_tokens={max_tokens} needs "
                f"{cdiv(total, bm.block_size)} KV blocks of {bm.block_size} tokens; the cache holds only "
                f"{bm.num_blocks} ({bm.num_blocks * bm.block_size} tokens)"
            )

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq.num_prompt_tokens, seq.sampling_params.max_tokens)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Drop a sequence from the queues and free its blocks (finish or abort). Its computed full blocks
        enter the prefix cache first (a request that ends in the step of its prefill still leaves its prompt
        for the next one sharing it); the blocks are released with the block manager's deferred ones (the
        engine: once its next step is launched), or at once when a check needs them."""
        if seq.status is SequenceStatus.RUNNING:
            self.block_manager.cache_full_blocks(seq)
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:  # (not while being admitted)
            self.waiting.remove(seq)
        self.block_manager.free(seq, defer=True)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step -------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        taken: set[int] = set()
        bs = bm.block_size
        running = SequenceStatus.RUNNING
        # decodes first, each group by arrival
        order = sorted(self.running, key=lambda s: (len(s.token_ids) - s.num_computed_tokens != 1, s.seq_id))
        for seq in order:
            if budget == 0:
                break
            if seq.status is not running:
                continue  # preempted earlier in this loop
            ntok = len(seq.token_ids)
            if ntok - len(seq.prompt_token_ids) >= seq.sampling_params.max_tokens:
                continue  # its last token is still in flight: it finishes when that step is read back
            computed = seq.num_computed_tokens
            n = min(ntok - computed, budget)
            if computed + n <= len(seq.block_table) * bs:  # the common decode step: no new block
                scheduled.append(ScheduledSeq(seq, n, computed))
                taken.add(seq.seq_id)
                budget -= n
                continue
            while not bm.can_append(seq, n):
                others = [s for s in self.running if s.seq_id not in taken and s is not seq]
                victim = max(others, key=lambda s: s.seq_id) if others else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            bm.append(seq, n)
            scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
            taken.add(seq.seq_id)
            budget -= n
        if not preempted:
            skipped: list[Sequence] = []  # waiting on a LoRA slot; keep their place in the queue
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                cached = bm.find_cached_prefix(seq)
                n = min(seq.num_tokens - len(cached) * bm.block_size, budget)
                if not bm.can_allocate(seq, n, cached):
                    break
                self.waiting.popleft()
                if self.admit is not None and not self.admit(seq):
                    if seq.status is not SequenceStatus.FINISHED:  # (the hook may fail the request)
                        skipped.append(seq)
                    continue
                bm.allocate(seq, n, cached)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
                budget -= n
            self.waiting.extendleft(reversed(skipped))
        return SchedulerOutput(scheduled, preempted)

    def advance(self, out: SchedulerOutput) -> None:
        """Once a step is launched: its tokens count as computed (the next schedule starts after them)."""
        running = SequenceStatus.RUNNING
        for item in out.scheduled:
            if item.seq.status is running:
                item.seq.num_computed_tokens = item.start + item.num_new_tokens

    def cache_blocks(self, out: SchedulerOutput) -> None:
        """Once a step's sampled tokens are known: register the blocks that filled up in the prefix cache."""
        bm = self.block_manager
        if not bm.enable_prefix_caching:
            return
        bs, running = bm.block_size, SequenceStatus.RUNNING
        for item in out.scheduled:
            seq = item.seq
            # (cache_full_blocks' own early exit, inlined: most steps fill no block)
            if seq.status is running and seq.num_computed_tokens // bs > seq.num_registered_blocks:
                bm.cache_full_blocks(seq)

    def commit(self, out: SchedulerOutput) -> None:
        """``advance`` + ``cache_blocks`` (a step run synchronously)."""
        self.advance(out)
        self.cache_blocks(out)
