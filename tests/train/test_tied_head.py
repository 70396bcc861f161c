"""A tied embedding/head trained with our kernels: the weight's gradient from the lookup's backward in one
pass (``kernels/cross_entropy.py`` ``tied_embedding``, ``model/qwen3.py`` ``TIED_HEAD_GRAD``) equals autograd's
sum of the two gradients, for the whole model's loss and every parameter, fp32 and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from llmray.config import ModelConfig

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels: CUDA, or the interpreter on CPU


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_tied_head_gradient_path_equals_autograd_sum(autocast, monkeypatch):
    import llmray.model.qwen3 as q3

    mc = ModelConfig.preset("tiny", num_hidden_layers=1, vocab_size=96)
    assert mc.tie_word_embeddings
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 9))
    ids[0, :3] = 5  # repeated ids: their rows accumulate
    ids = ids.to(DEV)
    results = []
    for tied in (True, False):
        monkeypatch.setattr(q3, "TIED_HEAD_GRAD", tied)
        torch.manual_seed(1)
        model = q3.Qwen3ForCausalLM(mc, kernels="triton").to(DEV)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l_tied, g_tied), (l_ref, g_ref) = results
    torch.testing.assert_close(l_tied, l_ref, rtol=0, atol=0)  # the forward is the same either way
    assert g_tied.keys() == g_ref.keys() and "model.embed_tokens.weight" in g_tied
    for name, g in g_tied.items():
        # CPU: the same ops in the same order; CUDA: atomics (attention's backward, index_add_) sum in any order
        rtol, atol = (1e-5, 1e-7) if DEV == "cpu" else (2e-2, 1e-3 * float(g_ref[name].abs().max()))
        torch.testing.assert_close(g, g_ref[name], rtol=rtol, atol=atol, msg=name)
