"""LoRA/QLoRA wrapping (peft + bitsandbytes), adapter files read by transformers, merging."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from llmray.config import LoraConfig
from llmray.model.checkpoint import load_model
from llmray.train import peft_adapters

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randomise_adapters(pm, seed: int = 0) -> None:
    """LoRA B starts at zero (a no-op adapter): give every adapter weight values so tests see its effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_only_adapters_trainable(tiny_model):
    pm = peft_adapters.apply_lora(tiny_model, LoraConfig(r=4, alpha=8, targets="attn"))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # attn preset = q and v of every layer, A and B each
    assert len(trainable) == 2 * 2 * tiny_model.config.num_hidden_layers
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)
    n_train, n_total = peft_adapters.trainable_parameters(pm)
    h, layers = tiny_model.config.hidden_size, tiny_model.config.num_hidden_layers
    q_out = tiny_model.config.num_attention_heads * tiny_model.config.head_dim
    kv_out = tiny_model.config.num_key_value_heads * tiny_model.config.head_dim
    assert n_train == layers * 4 * ((h + q_out) + (h + kv_out))


def test_unknown_target_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="name no linear layer"):
        peft_adapters.apply_lora(tiny_model, LoraConfig(targets="q_proj,qkv_proj"))


def test_qlora_targets_are_peft_bnb_linear4bit_over_uint8(tiny_model):
    pm = peft_adapters.apply_lora(tiny_model, LoraConfig(r=4, targets="all-linear", qlora=True))
    targeted = [(n, m) for n, m in pm.named_modules() if n.rsplit(".", 1)[-1] in LINEAR_NAMES]
    assert len(targeted) == 7 * tiny_model.config.num_hidden_layers
    for name, module in targeted:
        assert isinstance(module, peft.tuners.lora.bnb.Linear4bit), (name, type(module))
        w = module.get_base_layer().weight
        assert isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8, name
        assert w.quant_state.quant_type == "nf4" and w.quant_state.nested  # double quantisation
    assert isinstance(pm.get_input_embeddings(), nn.Embedding)  # embeddings/head stay full precision
    assert pm.get_input_embeddings().weight.dtype == torch.float32


def test_qlora_attn_preset_quantises_every_linear_but_wraps_only_targets(tiny_model):
    pm = peft_adapters.apply_lora(tiny_model, LoraConfig(r=4, targets="attn", qlora=True))
    layer = pm.base_model.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, peft.tuners.lora.bnb.Linear4bit)
    assert (
        type(layer.self_attn.k_proj) is bnb.nn.Linear4bit
        and layer.self_attn.k_proj.weight.dtype == torch.uint8
    )
    assert type(layer.mlp.down_proj) is bnb.nn.Linear4bit


def test_qlora_gradients_equal_lora_over_dequantised_base(tiny_model):
    """QLoRA's adapter gradients equal those of LoRA over the dequantised (fp32) weights, also after eval.

    The eval pass guards against bitsandbytes' CPU inference repacking, whose kernel has no backward.
    """
    import copy

    from bitsandbytes.functional import dequantize_4bit

    ref = copy.deepcopy(tiny_model)  # apply_lora quantises tiny_model in place
    cfg = LoraConfig(r=4, alpha=8, targets="all-linear", qlora=True)
    qpm = peft_adapters.apply_lora(tiny_model, cfg, gradient_checkpointing=True)
    _randomise_adapters(qpm)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
    with torch.no_grad():
        qpm.eval()(ids)
    qpm.train()
    qpm(ids, targets=ids.roll(-1, 1)).backward()
    for name, mod in qpm.base_model.model.named_modules():
        if isinstance(mod, peft.tuners.lora.bnb.Linear4bit):
            w = mod.get_base_layer().weight
            ref.get_submodule(name).weight.data = dequantize_4bit(w.data, w.quant_state).float()
    rpm = peft_adapters.apply_lora(
        ref, LoraConfig(r=4, alpha=8, targets="all-linear"), gradient_checkpointing=False
    )
    _randomise_adapters(rpm)
    rpm.train()(ids, targets=ids.roll(-1, 1)).backward()
    qgrads = {n: p.grad for n, p in qpm.named_parameters() if p.requires_grad}
    rgrads = {n: p.grad for n, p in rpm.named_parameters() if p.requires_grad}
    assert qgrads.keys() == rgrads.keys()
    for n in qgrads:
        torch.testing.assert_close(qgrads[n], rgrads[n], rtol=1e-4, atol=1e-6, msg=n)
    # layer 0's adapters only get gradient through the quantised layers above them
    assert qgrads["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].abs().sum() > 0


@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path):
    base = load_model(tiny_model_dir, dtype=torch.float32, kernels="torch")
    pm = peft_adapters.apply_lora(
        base, LoraConfig(r=4, alpha=8, targets="all-linear"), gradient_checkpointing=False
    )
    _randomise_adapters(pm, seed=1)
    return peft_adapters.save_adapter(pm, tmp_path / "adapter", tiny_model_dir, extra={"qlora": False})


def test_adapter_loads_on_transformers_with_same_logits(tiny_model_dir, adapter_dir):
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["auto_mapping"] is None and cfg["r"] == 4
    assert (adapter_dir / "adapter_model.safetensors").exists()
    ids = torch.randint(0, 300, (2, 16))
    ours = peft_adapters.load_with_adapter(tiny_model_dir, adapter_dir)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    with torch.no_grad():
        ref = ours(ids)
        got = hf(input_ids=ids).logits
        base = load_model(tiny_model_dir, dtype=torch.float32, kernels="torch")(ids)
    assert (ref - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_merge_equals_base_plus_adapter(tiny_model_dir, adapter_dir, tmp_path):
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        ref = peft_adapters.load_with_adapter(tiny_model_dir, adapter_dir)(ids)
    out32 = peft_adapters.merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "m32", dtype=torch.float32)
    merged = load_model(out32, kernels="torch")
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), ref, rtol=1e-5, atol=1e-5)
    # default: bf16 checkpoint (rounded once after an fp32 merge), tokenizer copied
    out16 = peft_adapters.merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "m16")
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out16 / "tokenizer.json").exists()
    with torch.no_grad():
        got16 = load_model(out16, dtype=torch.float32, kernels="torch")(ids)
    torch.testing.assert_close(got16, ref, rtol=0.0, atol=0.05)  # bf16 weights: ~3 significant digits
    with pytest.raises(FileExistsError):
        peft_adapters.merge_adapter(tiny_model_dir, adapter_dir, out16)
