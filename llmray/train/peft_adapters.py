"""LoRA and QLoRA on the llmray Qwen3 model through ``peft`` and ``bitsandbytes``; adapter save and merge.

The model file knows nothing of either: this module swaps modules from outside (as gpt-fast does).

- LoRA: ``peft.get_peft_model`` with ``LoraConfig(target_modules, r, lora_alpha, lora_dropout)``; peft
  freezes everything but the adapters (``lora_A``/``lora_B``).
- QLoRA (Dettmers et al. 2023): every ``nn.Linear`` of the decoder layers becomes a
  ``bitsandbytes.nn.Linear4bit`` holding NF4 weights with double quantisation (the absmax statistics are
  quantised too); embeddings, norms and the (tied) head stay in full precision. peft only wraps a
  ``Linear4bit`` as its ``peft.tuners.lora.bnb.Linear4bit`` when the model *declares* itself 4-bit
  (``model.is_loaded_in_4bit``, read by ``LoraModel._create_and_replace`` and passed to
  ``dispatch_bnb_4bit``); otherwise it would try a plain LoRA ``Linear`` over the packed uint8 weight.
  Compute dtype: bf16 on CUDA; fp32 on CPU (bitsandbytes' CPU backend dequantises to the compute dtype
  and runs a torch matmul: bf16 matmuls are slow on CPUs without AMX/AVX512-BF16, and fp32 keeps CPU
  tests exact against their references).
- Merging always loads the base in full precision from its checkpoint: merging into NF4 weights would
  add the quantisation error to the merged model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from llmray.config import LoraConfig as LlmrayLoraConfig
from llmray.model.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is a declared dependency
        raise ImportError("QLoRA needs bitsandbytes (pip install bitsandbytes)") from e
    return bnb


def resolve_compute_dtype(device: torch.device | str, compute_dtype: str = "auto") -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU for ``auto`` (see the module docstring)."""
    names = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    if compute_dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if compute_dtype not in names:
        raise ValueError(f"compute_dtype must be auto|bfloat16|float32|float16, got {compute_dtype!r}")
    return names[compute_dtype]


def quantize_nf4(
    model: Qwen3ForCausalLM, device: torch.device | str, compute_dtype: torch.dtype
) -> Qwen3ForCausalLM:
    """Replace the decoder's ``nn.Linear`` layers by NF4 ``Linear4bit`` (double quant) on ``device``.

    The model is moved to ``device`` (bitsandbytes quantises a ``Params4bit`` when it is moved there) and
    marked 4-bit for peft. Embedding, norms and head stay as they were.
    """
    bnb = _bnb()
    for layer in model.model.layers:
        assert isinstance(layer, Qwen3DecoderLayer), (
            f"Qwen3Model.layers holds decoder layers, got {type(layer).__name__}"
        )
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    compress_statistics=True,  # double quantisation
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.detach().contiguous(),  # quantised where it lands, in .to()
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                # bitsandbytes repacks a CPU weight for its AVX512-BF16 inference kernel the first time
                # it runs in eval mode, and that kernel has no backward: training after an evaluation
                # would get no input gradients through the base layers. Keep the differentiable path.
                q.support_avx512bf16_for_cpu = False
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.detach().clone(), requires_grad=False)
                setattr(parent, name, q)
    model.to(device)  # quantises every Params4bit (to uint8 storage) on the way
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit) and mod.weight.dtype != torch.uint8:
            raise RuntimeError(
                f"bitsandbytes did not quantise a Linear4bit on {device}: weight {mod.weight.dtype}"
            )
    # the flags peft reads (peft/tuners/lora/model.py _create_and_replace, peft_model.py): plain
    # attributes, which nn.Module's typed __setattr__ (tensors and modules) does not describe
    flags = {"is_loaded_in_4bit": True, "is_quantized": True, "quantization_method": "bitsandbytes"}
    for flag, value in flags.items():
        setattr(model, flag, value)
    return model


def peft_config(cfg: LlmrayLoraConfig) -> Any:
    import peft

    return peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules(),
        bias="none",
    )


def apply_lora(
    model: Qwen3ForCausalLM,
    cfg: LlmrayLoraConfig,
    device: torch.device | str = "cpu",
    compute_dtype: str = "auto",
    gradient_checkpointing: bool = True,
) -> Any:
    """Wrap ``model`` (fp32/bf16 weights, on CPU) for LoRA or QLoRA training; returns the PeftModel on ``device``.

    Only the adapter parameters require grad afterwards. Target names that match no module raise.
    """
    import peft

    names = cfg.target_modules()
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = [n for n in names if n not in present]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} name no linear layer; the model has {sorted(present)}")
    if cfg.qlora:
        quantize_nf4(model, device, resolve_compute_dtype(device, compute_dtype))
    else:
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    pm = peft.get_peft_model(model, peft_config(cfg))
    # adapters train in fp32 whatever the base dtype (peft creates them in the base layer's dtype)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            if "lora_" not in n:
                raise RuntimeError(f"non-adapter parameter {n} is trainable after get_peft_model")
            p.data = p.data.float()
    return pm


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a Params4bit counts its logical (unpacked) size."""
    trainable = total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        n = p.numel()
        if p.dtype == torch.uint8 and hasattr(p, "quant_state"):
            n = int(torch.Size(p.quant_state.shape).numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def adapter_state(pm: Any) -> dict[str, torch.Tensor]:
    """The adapter tensors (peft's names) on CPU, for checkpoints."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(pm).items()}


def load_adapter_state(pm: Any, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    # torch's load_state_dict result (missing_keys, unexpected_keys); peft annotates it `namedtuple`
    result: Any = set_peft_model_state_dict(pm, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"adapter state does not fit the model: missing {missing[:4]}, "
            f"unexpected {list(result.unexpected_keys)[:4]}"
        )


def save_adapter(
    pm: Any, out_dir: str | Path, base_dir: str | Path | None, extra: dict | None = None
) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) atomically.

    The config is made portable: ``task_type`` CAUSAL_LM, ``base_model_name_or_path`` the base checkpoint,
    no ``auto_mapping`` to llmray's class (transformers' Qwen3ForCausalLM loads it). ``extra`` is stored as
    ``llmray.json`` next to it (e.g. qlora, metrics).
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp-adapter")
    if tmp.exists():
        shutil.rmtree(tmp)
    pm.save_pretrained(str(tmp), safe_serialization=True)
    cfg_file = tmp / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(
        task_type="CAUSAL_LM",
        auto_mapping=None,
        inference_mode=True,
        base_model_name_or_path=str(Path(base_dir).resolve()) if base_dir else None,
    )
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    readme = tmp / "README.md"
    if readme.exists():
        readme.unlink()
    if extra is not None:
        (tmp / "llmray.json").write_text(json.dumps(extra, indent=2, sort_keys=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        old = out.with_name(out.name + ".old-adapter")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


# --- the earlier fine-tuning checkpoint format, read to resume it: adapter/ (PEFT dir),
# optimizer.safetensors, state.json (never pickle); new checkpoints are loop.save_checkpoint's ---
def load_training_state(path: Path, pm: Any, opt: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file

    load_adapter_state(pm, load_file(str(path / "adapter" / "adapter_model.safetensors")))
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    per_param: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(state.pop("optimizer_scalars").items()):
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    sd = opt.state_dict()
    sd["state"] = per_param
    opt.load_state_dict(sd)
    return state


def check_adapter_dir(lora_dir: str | Path) -> Path:
    path = Path(lora_dir)
    missing = [f for f in ADAPTER_FILES if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory: missing {', '.join(missing)}")
    return path


def load_with_adapter(
    base_dir: str | Path, lora_dir: str | Path, dtype: torch.dtype = torch.float32, kernels: str = "torch"
) -> Any:
    """The full-precision llmray base from ``base_dir`` with the adapter of ``lora_dir`` (a PeftModel, eval)."""
    import peft

    from llmray.model.checkpoint import load_model

    check_adapter_dir(lora_dir)
    base = load_model(base_dir, dtype=dtype, kernels=kernels)
    # the saved task_type CAUSAL_LM is for transformers; llmray's model takes the plain PeftModel wrapper
    config = peft.PeftConfig.from_pretrained(str(lora_dir))
    config.task_type = None
    return peft.PeftModel.from_pretrained(base, str(lora_dir), config=config, is_trainable=False).eval()


def merge_adapter(
    base_dir: str | Path, lora_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Merge ``lora_dir`` into the fp32 base of ``base_dir`` and write a ``dtype`` checkpoint to ``out_dir``.

    The merge is done in fp32 (W + B·A·alpha/r) and rounded once; the tokenizer files are copied.
    Writes into a temporary directory renamed at the end, so a failure leaves no partial checkpoint.
    """
    from llmray.model.checkpoint import save_model

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; merge writes a new checkpoint directory")
    pm = load_with_adapter(base_dir, lora_dir, dtype=torch.float32)
    merged = pm.merge_and_unload()
    if not isinstance(merged, Qwen3ForCausalLM):
        raise RuntimeError(f"merge_and_unload returned {type(merged).__name__}, expected Qwen3ForCausalLM")
    tmp = out.with_name(out.name + ".tmp-merge")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(merged, tmp, dtype=dtype)
    for name in TOKENIZER_FILES:
        if (Path(base_dir) / name).exists():
            shutil.copy2(Path(base_dir) / name, tmp / name)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
