"""StepInputs: the one-sequence fast path writes exactly what the general path writes (host buffer and
StepBatch), for prefill chunks and decodes, padded to graph layouts or exact, with placeholders and LoRA."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from llmray.engine.cuda_graphs import CudaGraphs
from llmray.engine.sampling_params import SamplingParams
from llmray.engine.scheduler import ScheduledSeq
from llmray.engine.sequence import PLACEHOLDER, Sequence
from llmray.engine.step_inputs import StepInputs


def _layout(kind: str, bucket: int, block_m: int):
    graphs = CudaGraphs.__new__(CudaGraphs)  # (layout() needs only these)
    graphs.max_num_seqs, graphs.block_m, graphs._layouts = 8, block_m, {}
    return graphs.layout(kind, bucket)


def _built(inputs: StepInputs, build, item, rows, layout, lora):
    host = inputs.host_np[(inputs._turn + 1) % len(inputs.host)]
    host[:] = 12345  # stale contents: every int the step reads must be written
    batch = build(item, rows, layout, lora)
    total = batch.tables.storage_offset() + batch.tables.numel()
    return host[:total].copy(), batch


@pytest.mark.parametrize("seed", range(6))
def test_one_sequence_path_equals_the_general_path(seed):
    rng = random.Random(seed)
    bs, block_m = 4, 16
    fast = StepInputs(torch.device("cpu"), 4096, bs, block_m, 64)
    slow = StepInputs(torch.device("cpu"), 4096, bs, block_m, 64)
    for case in range(12):
        n_prompt = rng.randint(1, 150)
        seq = Sequence("r", [rng.randrange(1000) for _ in range(n_prompt)], SamplingParams(max_tokens=4))
        decode = case % 3 == 0 and n_prompt > 1
        start = n_prompt - 1 if decode else rng.randrange(n_prompt)
        n = 1 if decode else rng.randint(1, n_prompt - start)
        if case % 4 == 1:  # a placeholder: the token a launch in flight samples
            seq.token_ids[start + n - 1] = PLACEHOLDER
            seq.sample_row = rng.randrange(8)
        seq.lora_slot = rng.choice([-1, 0, 3])
        seq.block_table = rng.sample(range(200), -(-(start + n) // bs))
        item = ScheduledSeq(seq, n, start)
        rows = [0] if start + n == seq.num_tokens or case % 2 else []
        lora = case % 5 == 0
        kind = "exact" if case % 2 else ("decode" if n == 1 else "prefill")
        layout = (
            None
            if kind == "exact"
            else _layout(kind, 1 if n == 1 else max(16, 1 << (n - 1).bit_length()), block_m)
        )
        got, a = _built(fast, lambda it, *x: fast._build_one(it[0], *x), [item], rows, layout, lora)
        fast.rows.release(seq)  # (its own row in the other buffer)
        want, b = _built(slow, slow._build_many, [item], rows, layout, lora)
        if not lora:  # the LoRA slots are written only for LoRA steps (graphs without LoRA never read them)
            lo = 4 * (a.layout.tokens + a.layout.tokens % 2)  # (after ids, pos, slots, src)
            got[lo : lo + a.layout.tokens] = want[lo : lo + a.layout.tokens]
        off = 0
        for size in a.layout.sizes():  # (the alignment pads between the arrays are never read)
            got[off + size : off + size + size % 2] = want[off + size : off + size + size % 2]
            off += size + size % 2
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed} case {case} n {n} start {start}")
        for f in ("layout", "num_tokens", "num_seqs", "num_decodes", "num_prefill_tiles", "width"):
            assert getattr(a, f) == getattr(b, f), f
        assert a.has_placeholders == b.has_placeholders and a.use_lora == b.use_lora
        assert a.tables.shape == b.tables.shape and a.last.shape == b.last.shape
        slow.rows.release(seq)


def test_a_chunk_ending_in_a_placeholder_gets_no_prefill_graph():
    """Prefill graphs are captured without placeholder substitution: a one-sequence chunk whose last token is
    in flight (a preempted sequence resuming) must go to a mixed graph or run eagerly."""
    from llmray.engine.runner import ModelRunner

    r = ModelRunner.__new__(ModelRunner)
    r.lora_batch, r._unsampled = None, None
    r.inputs = StepInputs(torch.device("cpu"), 4096, 4, 16, 64)
    picks = []

    class Graphs:
        def pick(self, *args):
            picks.append(args)  # (num_tokens, num_seqs, all_decode, no_decode)

    r._cuda_graphs = Graphs()  # type: ignore[assignment]
    r._forward = lambda *a, **k: torch.zeros(1)  # type: ignore[method-assign]
    seq = Sequence("r", list(range(10)), SamplingParams(max_tokens=4))
    seq.block_table = [0, 1, 2]
    r._run_model([ScheduledSeq(seq, 10, 0)], [0])
    seq.token_ids[-1], seq.sample_row = PLACEHOLDER, 0
    r._run_model([ScheduledSeq(seq, 10, 0)], [0])
    assert [p[3] for p in picks] == [True, False]
