"""skinny_projections: the model's projections on the weight-streaming GEMM give the same hidden states
(Triton interpreter on CPU), only inside the block, and leave LoRA-held hooks alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmray.engine import skinny
from llmray.engine.skinny import skinny_projections


def test_skinny_projections_same_hidden_states_and_restored(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    from llmray.kernels.skinny_gemm import _skinny_kernel

    if torch.cuda.is_available() or not isinstance(_skinny_kernel, InterpretedFunction):
        pytest.skip("CPU check under TRITON_INTERPRET=1 (tests/engine/conftest.py)")
    from llmray.config import ModelConfig
    from llmray.model.qwen3 import Qwen3ForCausalLM

    monkeypatch.setattr(skinny, "INTERPRETED", True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(ModelConfig.preset("tiny", num_hidden_layers=1), kernels="torch").eval()
    model.fuse_projections()
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)}
    shapes |= {tuple(w.shape) for w in (model.model.layers[0].self_attn.qkv_weight,)}
    shapes |= {tuple(model.model.layers[0].mlp.gate_up_weight.shape)}
    configs = {s: (64, 64, 1, 2, 4) for s in shapes}  # (few programs: the interpreter's cost)
    configs[(64, 64)] = (64, 32, 2, 2, 4)  # o_proj: split-K + the partials' sum
    calls = []
    run = skinny.skinny_linear
    monkeypatch.setattr(skinny, "skinny_linear", lambda *a, **k: calls.append(1) or run(*a, **k))
    ids = torch.randint(0, 256, (1, 9))
    pos = torch.arange(9)[None]
    with torch.no_grad():
        ref = model.hidden_states(ids, pos, None)
        mlp = model.model.layers[0].mlp
        mlp.gate_up_linear = lora_hook = lambda x, w: torch.nn.functional.linear(x, w)  # (a LoRA hook: kept)
        with skinny_projections(model, configs):
            got = model.hidden_states(ids, pos, None)
            assert mlp.gate_up_linear is lora_hook
        mlp.gate_up_linear = None
    layers = len(model.model.layers)
    # o_proj, down_proj and gate|up where unhooked (q|k|v: fused only with the norm+rope kernel, on GPU)
    assert len(calls) == 3 * layers - 1
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    lin = model.model.layers[0].mlp.down_proj
    assert "forward" not in vars(lin) and model.model.layers[0].self_attn.qkv_linear is None
