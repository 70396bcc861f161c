"""Hugging Face checkpoint interop: sharded files, dtypes, tied heads, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from llmray.model.checkpoint import load_config, load_model, save_model


def test_roundtrip_bf16_and_config_fields(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path, dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert cfg["torch_dtype"] == "bfloat16" and cfg["head_dim"] == tiny_model.config.head_dim
    assert (tmp_path / "generation_config.json").exists()
    loaded = load_model(tmp_path, kernels="torch")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    ref = tiny_model.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(loaded.model.embed_tokens.weight, ref)


def test_sharded_checkpoint_with_tied_head_written(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path)
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}  # includes lm_head.weight
    names = sorted(state)
    half = len(names) // 2
    (tmp_path / "model.safetensors").unlink()
    weight_map = {}
    for i, chunk in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k].clone() for k in chunk}, str(tmp_path / fname))
        weight_map.update(dict.fromkeys(chunk, fname))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_model(tmp_path, kernels="torch")
    x = torch.randint(0, tiny_model.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(x), tiny_model(x), atol=1e-6)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)


def test_wrong_model_type(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type='llama'"):
        load_model(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"tensor model.layers.0.mlp.down_proj.weight has shape \(64, 128\), the config expects \(64, 96\)",
    ):
        load_model(tmp_path)


def test_pickle_weights_are_refused(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="never unpickles"):
        load_model(tmp_path)


def test_missing_tensor_reported(tiny_model, tmp_path):
    state = {k: v for k, v in tiny_model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    save_model(tiny_model, tmp_path)
    save_file(
        {k: v.clone().contiguous() for k, v in state.items() if k != "lm_head.weight"},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(ValueError, match="lacks tensors.*layers.1.mlp.up_proj"):
        load_model(tmp_path)
