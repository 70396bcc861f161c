"""Multi-LoRA engine on CUDA (``-m gpu``): Triton shrink/expand inside CUDA graphs equal merged weights."""

from __future__ import annotations

import json

import pytest
import torch
from _support.models import gpu_test_model
from safetensors.torch import save_file

from llmray.engine.llm import LLM
from llmray.engine.sampling_params import SamplingParams
from llmray.lora.adapter import MODULES, load_adapter, module_shape
from llmray.model.generate import generate

pytestmark = pytest.mark.gpu
PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def _write_adapter(path, config, rank, seed, modules=MODULES):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in modules:
            fan_in, fan_out = module_shape(config, module)
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.3
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(modules)}
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _merged(model, adapter_dir):
    """A copy of ``model`` with W + scaling * B @ A folded into every targeted weight (the reference)."""
    import copy

    merged = copy.deepcopy(model)
    adapter = load_adapter("x", adapter_dir, model.config, 64)
    with torch.no_grad():
        for (i, module), (a, b) in adapter.weights.items():
            layer = merged.model.layers[i]
            lin = getattr(
                layer.self_attn if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp,
                module,
            )
            lin.weight += adapter.scaling * (b.cuda().float() @ a.cuda().float()).to(lin.weight.dtype)
    return merged


def test_fp32_mixed_batch_with_graphs_equals_merged_reference(tmp_path):
    model = gpu_test_model(torch.float32)
    cfg = model.config
    _write_adapter(tmp_path / "a", cfg, 16, seed=1)
    _write_adapter(tmp_path / "b", cfg, 8, seed=2, modules=("q_proj", "v_proj"))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (1, 9, 40, 130, 7, 300)]
    names = [None, "a", "b", "a", "b", None]
    refs = {None: model, "a": _merged(model, tmp_path / "a"), "b": _merged(model, tmp_path / "b")}
    expect = [generate(refs[n], p, PARAMS.max_tokens) for p, n in zip(prompts, names, strict=True)]
    assert expect[1] != generate(model, prompts[1], PARAMS.max_tokens)  # the adapter changes the answer
    llm = LLM.from_model(
        model,
        dtype="float32",
        num_kv_blocks=1024,
        max_loras=2,
        max_lora_rank=16,
        loras={"a": tmp_path / "a", "b": tmp_path / "b"},
    )
    assert ("decode", 1, True) in llm.engine.runner.graphs  # decode steps replay LoRA graphs
    outs = llm.generate(prompts, PARAMS, lora=names)
    assert [o.token_ids for o in outs] == expect


def test_bf16_lora_graphs_on_and_off_agree(tmp_path):
    cfg = gpu_test_model(torch.bfloat16).config
    for i in range(3):
        _write_adapter(tmp_path / f"a{i}", cfg, 16, seed=i)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (3, 50, 17, 200, 5, 64, 9, 33)]
    names = [None, "a0", "a1", "a2", "a0", None, "a1", "a2"]
    tokens = []
    for eager in (False, True):
        llm = LLM.from_model(
            gpu_test_model(torch.bfloat16),
            enforce_eager=eager,
            num_kv_blocks=1024,
            max_loras=2,
            loras={f"a{i}": tmp_path / f"a{i}" for i in range(3)},
        )
        tokens.append([o.token_ids for o in llm.generate(prompts, PARAMS, lora=names)])
    assert tokens[0] == tokens[1]
