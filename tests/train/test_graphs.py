"""CUDA-graphed training steps (llmray.train.graphs) equal eager ones: pretraining (fp32 master weights,
Muon) and our LoRA layers, same losses and weights after several steps, a new shape running eagerly."""

from __future__ import annotations

import copy

import pytest
import torch

from llmray.config import LoraConfig, ModelConfig
from llmray.model.qwen3 import Qwen3ForCausalLM
from llmray.train import adapters
from llmray.train.graphs import StepGraphs
from llmray.train.harness import train_step
from llmray.train.loop import build_optimizer

pytestmark = pytest.mark.gpu


def _run(model, opt_name: str, batches, graphs: bool, accumulate: bool = False):
    dev = torch.device("cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, opt_name, lr=1e-3, muon_lr=0.02)
    sg = StepGraphs(model, params, dev, torch.bfloat16, warmup=1, accumulate=accumulate) if graphs else None
    losses = []
    for ids in batches:
        loss, _ = train_step(
            model, [(ids[:, :-1], ids[:, 1:])], 1, opt, params, dev, torch.bfloat16, 1.0, graphs=sg
        )
        losses.append(loss.item())
    return losses, model, sg


def _batches(vocab: int, shapes) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randint(0, vocab, s, device="cuda", generator=g) for s in shapes]


@pytest.mark.parametrize(("kind", "accumulate"), [("pretrain", False), ("lora", False), ("pretrain", True)])
def test_graphed_steps_equal_eager(kind, accumulate):
    torch.manual_seed(0)
    base = Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="triton").cuda().train()
    if kind == "lora":
        base = adapters.apply_lora(base.to(torch.bfloat16), LoraConfig(r=4, alpha=8, targets="all-linear"))
    shapes = [(4, 33)] * 5 + [(2, 17)] + [(4, 33)] * 2  # one other shape in between: eager
    batches = _batches(base.config.vocab_size, shapes)
    opt = "muon" if kind == "pretrain" else "adamw"
    eager, m_eager, _ = _run(copy.deepcopy(base), opt, batches, False)
    graphed, m_graph, sg = _run(copy.deepcopy(base), opt, batches, True, accumulate)
    assert sg is not None and sg.replays == 6 and len(sg.graphs) == 1, (sg.replays, list(sg.graphs))
    torch.testing.assert_close(graphed, eager, rtol=2e-3, atol=2e-3)
    for (n, a), b in zip(m_eager.named_parameters(), m_graph.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3, msg=n)


def test_compile_ahead_changes_nothing_but_the_kernel_caches():
    """warmup.precompile_training before the first step (what ``train_steps`` does on one GPU): weights and
    every gradient untouched, Muon's state as before a first step, the same losses and weights after it."""
    from llmray.train.warmup import precompile_training

    torch.manual_seed(1)
    base = Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="triton").cuda().train()
    batches = _batches(base.config.vocab_size, [(4, 65)] * 4)
    plain, m_plain, _ = _run(copy.deepcopy(base), "muon", batches, True)
    model = copy.deepcopy(base)
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, "muon", lr=1e-3, muon_lr=0.02)
    ids = batches[0]
    info = precompile_training(model, ids[:, :-1], ids[:, 1:], torch.device("cuda"), torch.bfloat16, opt)
    assert info["submitted"] > 0 and not info["errors"], info
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    params = list(model.parameters())
    sg = StepGraphs(model, params, torch.device("cuda"), torch.bfloat16, warmup=1)
    ahead = []
    for x in batches:
        loss, _ = train_step(model, [(x[:, :-1], x[:, 1:])], 1, opt, params, torch.device("cuda"),
                             torch.bfloat16, 1.0, graphs=sg)  # fmt: skip
        ahead.append(loss.item())
    torch.testing.assert_close(ahead, plain, rtol=1e-4, atol=1e-5)  # atomics: not always bit-equal
    for a, b in zip(m_plain.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
