"""The engine's fused q/k/v and gate/up GEMMs (``Qwen3ForCausalLM.fuse_projections``) compute the same
function as the separate projections, follow ``.to()``, and stay out of autograd."""

from __future__ import annotations

import torch

from llmray.config import ModelConfig
from llmray.model.qwen3 import Qwen3ForCausalLM


def test_fused_projections_match_and_follow_dtype_changes():
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="torch").eval()
    ids = torch.randint(0, 512, (2, 9))
    one = ids[:1, :1]  # q/k/v run fused for a single token (a batch-1 decode step)
    with torch.no_grad():
        ref, ref_one = model(ids), model(one)
        model.fuse_projections()
        attn = model.model.layers[0].self_attn
        assert attn.qkv_weight is not None and model.model.layers[0].mlp.gate_up_weight is not None
        torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(one), ref_one, rtol=1e-5, atol=1e-5)
        model.to(torch.float64)  # the fused copies are rebuilt in the new dtype
        assert attn.qkv_weight is not None and attn.qkv_weight.dtype == torch.float64
        torch.testing.assert_close(model(ids).float(), ref, rtol=1e-4, atol=1e-4)
    model.to(torch.float32).train()
    model(ids, targets=ids).backward()  # with autograd the separate projections run and get gradients
    assert attn.q_proj.weight.grad is not None and attn.v_proj.weight.grad is not None
    assert model.unfuse_projections() and attn.qkv_weight is None


def test_fused_qkv_with_the_fused_norm_rope_kernel_over_many_tokens():
    # Triton ops (the interpreter on CPU): a multi-token forward runs the fused q|k|v GEMM and reads q/k as
    # strided views of its row in the one-launch q/k norm + rope kernel; same logits as the torch ops
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", num_hidden_layers=1)
    model = Qwen3ForCausalLM(cfg, kernels="torch").eval()
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        ref = model(ids)
        model.fuse_projections()
        model.set_kernels("triton")
        assert model.ops.qk_norm_rope is not None
        torch.testing.assert_close(model(ids), ref, rtol=1e-4, atol=1e-4)


def test_a_second_engine_on_one_model_leaves_the_first_ones_weights_in_place():
    # CUDA graphs hold the addresses of the fused copies: building another engine on the same model (the fp8
    # test: a bf16-KV and an fp8-KV engine) must not rebuild them (it did: the first engine's replays then
    # read other layers' or freed memory, NaN perplexity / an illegal address on the H200)
    from llmray.engine.llm import LLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(ModelConfig.preset("tiny", num_hidden_layers=2), kernels="torch").eval()
    LLM.from_model(model, kernels="torch", num_kv_blocks=8)

    def ptrs():
        return [
            (m.self_attn.qkv_weight.data_ptr(), m.mlp.gate_up_weight.data_ptr()) for m in model.model.layers
        ]

    before = ptrs()
    LLM.from_model(model, kernels="torch", num_kv_blocks=8, kv_cache_dtype="fp8")
    assert ptrs() == before
