"""FP8 (e4m3) KV cache: half the bytes per token, and on a trained model the same predictions.

Quality is measured through the cache: the fp8 engine is teacher-forced (a TokenConstraint forcing each
token) along the model-dtype-KV greedy continuation, so every prediction comes from a decode step reading
fp8 K/V; the raw top-1 (logprobs are of the unmasked distribution) must equal the continuation at >= 95%
of positions, and the perplexity of held-out text (forced the same way) may rise by at most 1%.
On CPU (small sizes, a check of the method): a tiny char model trained for a few seconds; on the GPU (``-m gpu``): shakespeare-char shapes in
bf16, Triton kernels and CUDA graphs.
"""

from __future__ import annotations

import math

import pytest
import torch
from _support.data import shared_data

from llmray.config import ModelConfig
from llmray.engine.llm import LLM
from llmray.engine.sampling_params import SamplingParams
from llmray.model.qwen3 import Qwen3ForCausalLM

CUDA = torch.cuda.is_available()


class Force:
    """Teacher forcing through the constrained-decoding hook: the next token must be ``tokens[pos]``."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.pos = tokens, 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        t = self.tokens[self.pos]
        bitmask[row] = 0
        bitmask[row, t // 32] = torch.tensor(1 << (t % 32)).to(torch.int32)

    def accept_token(self, token_id: int) -> bool:
        self.pos += 1
        return token_id == self.tokens[self.pos - 1]

    def is_terminated(self) -> bool:
        return self.pos == len(self.tokens)


def _train_char_model(steps: int, preset: str, device: str) -> tuple[Qwen3ForCausalLM, list[int], list[int]]:
    text = shared_data("tinyshakespeare/input.txt").read_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in (text if CUDA else text[:200_000])])
    split = int(0.9 * len(ids))
    train, val = ids[:split], ids[split:]
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, vocab_size=len(chars))
    model = Qwen3ForCausalLM(cfg, kernels="torch" if not CUDA else "auto").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3 if not CUDA else 1e-3)
    g = torch.Generator().manual_seed(0)
    batch, block = (8, 64) if not CUDA else (64, 256)
    for _ in range(steps):
        starts = torch.randint(0, len(train) - block - 1, (batch,), generator=g)
        x = torch.stack([train[s : s + block] for s in starts]).to(device)
        y = torch.stack([train[s + 1 : s + block + 1] for s in starts]).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=CUDA):
            loss = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), train.tolist(), val.tolist()


def _forced(llm: LLM, prompts: list[list[int]], targets: list[list[int]]) -> list[list[dict[int, float]]]:
    """Per forced position, the raw logprobs {chosen, top-1} of the engine teacher-forced along targets."""
    engine = llm.engine
    params = SamplingParams(max_tokens=len(targets[0]), temperature=0.0, ignore_eos=True, logprobs=1)
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        engine.add_request(f"f{i}", p, params)
        engine.requests[f"f{i}"].seq.constraint = Force(t)
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    outs = [final[f"f{i}"] for i in range(len(prompts))]
    assert [o.token_ids for o in outs] == targets
    return [o.logprobs for o in outs]


@pytest.fixture(scope="module")
def trained():
    if CUDA:
        return _train_char_model(300, "shakespeare-char", "cuda")
    return _train_char_model(120, "tiny", "cpu")


def test_fp8_cache_halves_the_bytes_per_token():
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="torch").eval()
    a = LLM.from_model(model, kernels="torch", dtype="bfloat16", num_kv_blocks=16).engine.runner
    b = LLM.from_model(model, kernels="torch", dtype="bfloat16", num_kv_blocks=16, kv_cache_dtype="fp8")
    b = b.engine.runner
    assert b.kv_cache.dtype == torch.float8_e4m3fn and b.block_bytes * 2 == a.block_bytes
    assert (b.cache.k_scales > 0).all() and (b.cache.v_scales > 0).all()
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM.from_model(model, kernels="torch", kv_cache_dtype="fp4")


def test_fp8_predictions_match_on_a_trained_model(trained):
    model, train, val = trained
    g = torch.Generator().manual_seed(1)
    n_prompts, n_new, plen = (32, 64, 48) if CUDA else (8, 24, 16)  # the sizes on the GPU
    starts = torch.randint(0, len(train) - plen, (n_prompts,), generator=g).tolist()
    prompts = [train[s : s + plen] for s in starts]
    kw = dict(kernels="torch") if not CUDA else {}
    base = LLM.from_model(model, num_kv_blocks=1024, **kw)
    greedy = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    cont = [o.token_ids for o in base.generate(prompts, greedy)]
    fp8 = LLM.from_model(model, num_kv_blocks=1024, kv_cache_dtype="fp8", **kw)
    lps = _forced(fp8, prompts, cont)
    top1 = [[max(d, key=d.get) for d in row] for row in lps]
    agree = sum(a == b for ra, rb in zip(top1, cont, strict=True) for a, b in zip(ra, rb, strict=True))
    rate = agree / (n_prompts * n_new)
    # held-out perplexity, both caches teacher-forced the same way
    vs = torch.randint(0, len(val) - plen - n_new, (16 if CUDA else 4,), generator=g).tolist()
    vp, vt = [val[s : s + plen] for s in vs], [val[s + plen : s + plen + n_new] for s in vs]
    ppl = {}
    for name, llm in (("base", base), ("fp8", fp8)):
        rows = _forced(llm, vp, vt)
        nll = -sum(d[t] for row, ts in zip(rows, vt, strict=True) for d, t in zip(row, ts, strict=True))
        ppl[name] = math.exp(nll / (len(vp) * n_new))
    print(f"fp8 KV: top-1 agreement {rate:.4f}, held-out ppl {ppl['base']:.4f} -> {ppl['fp8']:.4f}")
    assert ppl["base"] < 20  # the model did learn something (a uniform guess is 65)
    assert rate >= 0.95
    assert ppl["fp8"] <= 1.01 * ppl["base"]


@pytest.mark.gpu
def test_fp8_predictions_match_on_a_trained_model_gpu(trained):
    """The same check on the GPU (selected by ``-m gpu``): bf16, Triton kernels, CUDA graphs."""
    assert CUDA
    test_fp8_predictions_match_on_a_trained_model(trained)
