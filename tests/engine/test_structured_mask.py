"""The grammar-mask kernel (llmray/kernels/token_bitmask.py): masking the logits in place from the int32 bitmask
gives exactly the torch reference (bf16 and fp32, all rows or selected rows, a vocabulary that is not a multiple
of 32 or of the block). CPU runs it under the Triton interpreter (small shapes)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmray.kernels.token_bitmask import apply_token_bitmask_, apply_token_bitmask_torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bitmask(rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    words = -(-vocab // 32)
    bits = torch.randint(0, 2**32, (rows, words), generator=gen, dtype=torch.int64)
    bits[0] = -1  # an all-ones row
    bits[-1, 1:] = 0  # a row allowing only tokens of its first word
    return (bits - (bits >= 2**31).long() * 2**32).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("select", [False, True])
def test_kernel_matches_torch(dtype, select):
    gen = torch.Generator().manual_seed(1)
    vocab, bsz = 2100, 5  # 2100 = 65.6 words, and past one 2048-token block (bf16: blocks of 1024 or 2048)
    logits = torch.randn(bsz, vocab, generator=gen).to(dtype)
    if select:
        rows = torch.tensor([3, 0, 4], dtype=torch.int32)
        mask = _bitmask(len(rows), vocab, gen)
    else:
        rows, mask = None, _bitmask(bsz, vocab, gen)
    want = apply_token_bitmask_torch(logits, mask, rows)
    got = logits.to(DEVICE)
    block = None if dtype == torch.float32 else 1024 if select else 2048  # (None: the default block)
    out = apply_token_bitmask_(got, mask.to(DEVICE), None if rows is None else rows.to(DEVICE), block=block)
    assert out is got  # in place
    assert torch.equal(got.cpu(), want)
    # the bit convention: token t allowed iff bit t % 32 of word t // 32
    r = 1 if rows is None else int(rows[1])
    i = 1
    for t in (0, 31, 32, 33, 2099):
        allowed = (int(mask[i, t // 32]) >> (t % 32)) & 1
        assert (want[r, t] == float("-inf")) == (not allowed)


def test_wait_flag_passes_at_the_flag_and_gives_up_counting():
    # the device-side wait for the mask worker (StepMasks.device_wait): it returns once the flag reaches the
    # job's number, and past its poll limit it returns anyway and counts the late wait (never a hang)
    from llmray.kernels.token_bitmask import wait_flag

    flag = torch.tensor([7], dtype=torch.int32, device=DEVICE)
    late = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    wait_flag(flag, 7, late)
    wait_flag(flag, 3, late)
    assert int(late[0]) == 0
    wait_flag(flag, 8, late, max_iters=50)
    assert int(late[0]) == 1


@pytest.mark.skipif(DEVICE != "cuda", reason="the device polls pinned host memory")
def test_wait_flag_on_a_host_flag_holds_a_copy_until_a_host_thread_stores_it():
    # StepMasks.host_flag: the worker fills the host masks, then stores the job's number into a pinned host
    # word; the copy queued behind the device's poll of that word must see the filled masks
    import threading
    import time

    from llmray.kernels.token_bitmask import wait_flag

    flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    masks = torch.full((4, 1000), 5, dtype=torch.int32, pin_memory=True)
    late = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    dev = torch.zeros(4, 1000, dtype=torch.int32, device=DEVICE)

    def worker() -> None:
        time.sleep(0.05)
        masks.numpy()[:] = 7
        flag.numpy()[0] = 3

    wait_flag(flag, 3, late, max_iters=10_000_000)
    dev.copy_(masks, non_blocking=True)
    thread = threading.Thread(target=worker)
    thread.start()
    torch.cuda.synchronize()
    thread.join()
    assert int(late[0]) == 0 and bool((dev == 7).all())


def test_sampler_masks_constrained_rows_in_the_model_dtype():
    """The sampler with a bitmask: every row samples an allowed token; greedy rows take the allowed argmax; on
    CUDA the in-place kernel path (bf16 logits) and the torch path give the same greedy tokens."""
    from llmray.engine.sampler import Sampler
    from llmray.engine.sampling_params import SamplingParams
    from llmray.engine.sequence import Sequence

    gen = torch.Generator().manual_seed(2)
    vocab, bsz = 2100, 4
    mask = _bitmask(bsz, vocab, gen)
    allowed = apply_token_bitmask_torch(torch.zeros(bsz, vocab), mask) == 0
    logits = torch.randn(bsz, vocab, generator=gen).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * 2
    seqs = [Sequence(f"r{i}", [1, 2], p) for i, p in enumerate(params)]
    sampler = Sampler(torch.device(DEVICE))
    outs = []
    for kernel in (True, False):
        sampler.kernel_mask = kernel
        tokens = sampler(logits.to(DEVICE).clone(), seqs, None, mask.to(DEVICE)).token_ids.cpu()
        assert all(allowed[i, t] for i, t in enumerate(tokens.tolist()))
        outs.append(tokens)
    want = logits.float().masked_fill(~allowed, float("-inf")).argmax(-1)
    assert outs[0][0::2].tolist() == outs[1][0::2].tolist() == want[0::2].tolist()


def test_a_prepared_step_samples_the_tokens_of_an_unprepared_one():
    """``Sampler.prepare`` (the host work of a constrained step done before its masks are filled) changes no
    token: greedy, seeded and unseeded rows, steps in a row with and without it (the draw counters advance
    alike). CPU: the
    fused kernel under the Triton interpreter (the sampler told it is on CUDA: only its path choice reads it)."""
    from llmray.engine.sampler import Sampler
    from llmray.engine.sampling_params import SamplingParams
    from llmray.engine.sequence import Sequence

    gen = torch.Generator().manual_seed(3)
    vocab = 2100
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=5),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, seed=9),
    ]
    seqs = [Sequence(f"r{i}", [1, 2], p) for i, p in enumerate(params)]
    mask = _bitmask(len(seqs), vocab, gen).to(DEVICE)
    plain, prepared = Sampler(torch.device(DEVICE), seed=4), Sampler(torch.device(DEVICE), seed=4)
    if DEVICE == "cpu":
        plain.device = prepared.device = torch.device("cuda")
    for step in range(4):  # prepared twice (the second time from the kept rows), then not, then again
        logits = torch.randn(len(seqs), vocab, generator=gen).to(DEVICE)
        want = plain(logits.clone(), seqs, None, mask).token_ids
        if step != 2:
            prepared.prepare(seqs, None)
            assert prepared._plan is not None
        got = prepared(logits.clone(), seqs, None, mask).token_ids
        assert prepared._plan is None and torch.equal(got.cpu(), want.cpu()), step
    prepared.prepare([Sequence("lp", [1], SamplingParams(logprobs=2))], None)
    assert prepared._plan is None  # only plain steps are prepared
