"""Per-row LoRA application equals peft's, for mixed batches; adapter validation errors; slot LRU."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from _support.lora import make_peft_adapter

from llmray.lora.adapter import AdapterError, load_adapter
from llmray.lora.manager import LoraManager, NoFreeSlot

peft = pytest.importorskip("peft")


@pytest.fixture
def adapters(tiny_model, tmp_path):
    a = make_peft_adapter(tiny_model, tmp_path / "a", ["q_proj", "v_proj"], 4, 8, seed=1)
    b = make_peft_adapter(
        tiny_model,
        tmp_path / "b",
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        8,
        16,
        seed=2,
    )
    return {"a": (a, tmp_path / "a"), "b": (b, tmp_path / "b")}


@pytest.fixture(params=["torch", "triton"])
def lora_path(request, monkeypatch):
    """Run the LoRA deltas through the torch reference, or the Triton kernels (interpreter on CPU)."""
    from llmray.lora.layers import LoRALinear

    if request.param == "triton" and not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton path on CPU needs TRITON_INTERPRET=1 before triton is imported")
        monkeypatch.setattr(LoRALinear, "use_kernels_on_cpu", True)
    return request.param


def test_mixed_batch_rows_equal_each_adapter_alone(tiny_model, adapters, lora_path):
    x = torch.randint(0, tiny_model.config.vocab_size, (1, 12))
    with torch.no_grad():
        expect = {"a": adapters["a"][0](x), "b": adapters["b"][0](x), None: tiny_model(x)}
    served = copy.deepcopy(tiny_model)
    mgr = LoraManager(served, served.config, max_loras=2, max_rank=8, max_cpu_loras=4, max_rows=64)
    for name, (_, path) in adapters.items():
        mgr.add(name, path)
    # pack three copies of the sequence (base, a, b) into one forward of 36 rows
    rows = torch.cat([x, x, x], dim=1)
    pos = torch.arange(12).repeat(3).unsqueeze(0)
    slot_a, slot_b = mgr.acquire("a"), mgr.acquire("b")
    mgr.batch.set_rows(torch.tensor([-1] * 12 + [slot_a] * 12 + [slot_b] * 12, dtype=torch.int32))
    mgr.batch.enabled = True

    class ThreeSeqs:  # causal attention within each 12-token segment
        def attend(self, layer_idx, q, k, v):
            from llmray.model.attention import causal_attention

            outs = [
                causal_attention(q[:, i : i + 12], k[:, i : i + 12], v[:, i : i + 12], q.shape[-1] ** -0.5)
                for i in (0, 12, 24)
            ]
            return torch.cat(outs, dim=1)

    with torch.no_grad():
        got = served(rows, positions=pos, attn_metadata=ThreeSeqs())
    torch.testing.assert_close(got[:, :12], expect[None], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[:, 12:24], expect["a"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[:, 24:], expect["b"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expect["a"], expect[None], atol=1e-3)  # the adapters do change the output


def test_slots_lru_and_holds(tiny_model, adapters, tmp_path):
    mgr = LoraManager(
        copy.deepcopy(tiny_model), tiny_model.config, max_loras=1, max_rank=8, max_cpu_loras=2, max_rows=8
    )
    mgr.add("a", adapters["a"][1])
    mgr.add("b", adapters["b"][1])
    assert mgr.acquire("a") == 0
    assert not mgr.can_acquire(mgr.get("b"))
    with pytest.raises(NoFreeSlot):
        mgr.acquire("b")
    mgr.release(0)
    assert mgr.acquire("b") == 0 and [k[0] for k in mgr.slot_of] == ["b"]  # a evicted from the device
    layer = mgr.layers[(0, "down_proj")]
    assert layer.lora_b[0].abs().sum() > 0  # b targets down_proj, a does not
    # removing an adapter in use retires its slot: the running request keeps its weights until release
    mgr.remove("b")
    assert mgr.names() == ["a"] and not mgr.can_acquire(mgr.get("a"))
    assert layer.lora_b[0].abs().sum() > 0
    mgr.release(0)
    assert layer.lora_b[0].abs().sum() == 0 and mgr.batch.scales[0] == 0
    assert mgr.acquire("a") == 0 and mgr.id_of("a") > 0
    with pytest.raises(RuntimeError, match="not held"):
        mgr.release(0) or mgr.release(0)
    with pytest.raises(KeyError, match="unknown LoRA adapter"):
        mgr.remove("b")


def test_bad_adapter_directories(tiny_model, adapters, tmp_path):
    cfg = tiny_model.config
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter("x", tmp_path / "missing", cfg, 16)
    with pytest.raises(AdapterError, match="exceeds the server's max_lora_rank=4"):
        load_adapter("b", adapters["b"][1], cfg, 4)
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterError, match="never unpickles"):
        load_adapter("p", bad, cfg, 16)
    (bad / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="not a valid safetensors"):
        load_adapter("p", bad, cfg, 16)
    wide = copy.deepcopy(tiny_model.config).replace(hidden_size=96, head_dim=24)
    with pytest.raises(AdapterError, match="the base model needs A"):
        load_adapter("a", adapters["a"][1], wide, 16)
