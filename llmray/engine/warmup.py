"""Start-up warm-up: run one step of each shape class the engine will meet, so that ``LLM()`` returns (and a
server reports ready) with every Triton kernel variant compiled and cuBLAS/sampler state initialised.

CUDA graphs compile their kernels while being captured; this covers the eager steps (mixed steps above
``max_graph_tokens``, or every step with ``enforce_eager``): token counts on both sides of Triton's
divisible-by-16 specialisation, decode rows next to prefill chunks, chunks after a cached prefix, each
sampler path (greedy, temperature + top-k/top-p/min-p, seeded, logprobs, penalties), with LoRA rows if
adapters are served. Then the shapes of a loaded engine's first batch: a full budget of prefill chunks next
to many decode rows, many short chunks after cached prefixes (prompts that share most of their blocks), and
the LM head + sampler at every row count up to ``max_num_seqs`` (each picks its own GEMM kernel, loaded
on first use). Fake sequences point at arbitrary KV blocks: nothing is registered in the block manager,
and a block's K/V is always written before it is read once a real sequence owns it. Compiled kernels also
persist in Triton's on-disk cache (``TRITON_CACHE_DIR``, default ~/.triton/cache), so a second start-up
compiles nothing.
"""

from __future__ import annotations

import logging
import time

import torch

from llmray.engine.sampling_params import SamplingParams
from llmray.engine.scheduler import ScheduledSeq
from llmray.engine.sequence import Sequence

logger = logging.getLogger("llmray.engine")

_PARAMS = [
    SamplingParams(max_tokens=1, temperature=0.0),
    SamplingParams(max_tokens=1, temperature=0.6),  # temperature only: the fused Gumbel-max kernel
    SamplingParams(max_tokens=1, temperature=0.8, top_p=0.9, top_k=50, min_p=0.01),
    SamplingParams(max_tokens=1, temperature=0.7, seed=1, logprobs=2),
    SamplingParams(max_tokens=1, temperature=0.0, repetition_penalty=1.1, presence_penalty=0.5),
]


def _seq(runner, ctx: int, params: SamplingParams, lora: bool, salt: int) -> Sequence:
    seq = Sequence(f"warmup-{salt}", [0] * ctx, params)
    nblocks = -(-ctx // runner.block_size)
    seq.block_table = [(salt * 7 + i) % runner.num_blocks for i in range(nblocks)]
    seq.lora_slot = 0 if lora else -1
    return seq


def _step(runner, decodes: int, chunks: list[tuple[int, int]], params: SamplingParams, lora: bool) -> None:
    """One step: ``decodes`` one-token rows, then a prefill chunk per (new tokens, cached prefix) pair."""
    items = []
    top = runner.max_model_len - 1
    for i in range(decodes):
        seq = _seq(runner, min(40 + 17 * i, top), params, lora and i % 2 == 0, i)
        items.append(ScheduledSeq(seq, 1, seq.num_tokens - 1))
    for j, (new, prefix) in enumerate(chunks):
        seq = _seq(runner, prefix + new, params, lora, decodes + j)
        items.append(ScheduledSeq(seq, new, prefix))
    runner.collect(runner.launch(items))
    for it in items:
        runner.release(it.seq)


def _loaded_shapes(runner, budget: int, lora: bool) -> None:
    """A workload's first batch: full-budget prefill next to many decode rows; many chunks after prefixes;
    the LM head and sampler at every row count (what decode steps of a draining batch meet)."""
    seqs = runner.config.max_num_seqs
    temp = _PARAMS[1]
    for d in sorted({seqs // 4, seqs // 2, seqs - 1}):
        if 0 < d < budget:
            _step(runner, d, [(budget - d, 0)], temp, lora)
    new = 8
    prefix = max(0, min(35 * runner.block_size, runner.max_model_len - new))
    many = min(seqs, budget // new)
    if many > 1:
        _step(runner, 0, [(new, prefix)] * many, temp, False)
    hidden = torch.zeros(seqs, runner.model.config.hidden_size, dtype=runner.dtype, device=runner.device)
    rows = [Sequence(f"warmup-row-{r}", [0], temp) for r in range(seqs)]
    for r in range(1, seqs + 1):
        logits = runner.model.lm_head(hidden[:r])
        runner.sampler(logits, rows[:r], runner.eos_token_id)
        logits.argmax(dim=-1)
    for seq in rows:
        runner.sampler.release(seq)


@torch.inference_mode()
def warmup(runner) -> float:
    """Run the warm-up steps on ``runner`` (a ModelRunner); returns the seconds it took."""
    t0 = time.perf_counter()
    cfg = runner.config
    budget = min(cfg.max_num_batched_tokens, runner.max_model_len - 1)
    lora = runner.lora_batch is not None
    big = cfg.max_graph_tokens + 1 if runner.graphs else 1
    sizes = sorted(
        {n for n in (1, 3, 16, 17, 100, big, big + 15, 1024, budget - 1, budget) if 1 <= n <= budget}
    )
    for k, n in enumerate(sizes):
        params = _PARAMS[k % len(_PARAMS)]
        decodes = min(8, n - 1, cfg.max_num_seqs - 1)
        _step(runner, 0, [(n, 0)], params, False)  # a fresh prompt
        if decodes > 0:
            prefix = min(2 * runner.block_size + 3, runner.max_model_len - n)
            _step(runner, decodes, [(n - decodes, prefix)], params, lora)  # decodes + a chunk after a prefix
    for params in _PARAMS:  # decode-only steps through each sampler path
        _step(runner, min(4, cfg.max_num_seqs), [], params, lora)
    _loaded_shapes(runner, budget, lora)
    if runner.is_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    logger.info("engine warm-up: %d step shapes + a loaded batch's in %.1f s", len(sizes), dt)
    return dt
