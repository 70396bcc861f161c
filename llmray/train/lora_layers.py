"""llmray's own LoRA training layers (the default ``lora_impl="ours"``), reading and writing the PEFT format.

Why not peft in the training step: peft's ``lora.Linear`` casts the input to the adapter's fp32 dtype (a
full fp32 copy of every targeted layer's input, kept for backward), runs dropout, A and B as separate
modules and autograd nodes, and adds the result in another kernel. Measured on qwen3-0.6b, that overhead
made all-linear r16 LoRA train at 0.55x the speed of full fine-tuning (bench/results/finetune.json).

``LoraLinear`` replaces a targeted ``nn.Linear`` (or a bitsandbytes NF4 ``Linear4bit``) in place. Its
forward and backward are one autograd node (``_LoraFn``), in the compute dtype (bf16 under autocast):

    forward   y  = x W^T, then the expand accumulated into y by one addmm: y += s (x A^T) B^T
    backward  dh = s dy B;  dx = dy W + dh A (one mm + one addmm);  dB = s dy^T h;  dA = dh^T x

with h = x A^T (N, r), the only extra activation saved (x is the one the base matmul needs anyway). The
frozen base weight gets no gradient work at all (no grad buffer, no dW matmul). For an NF4 base the
weight is dequantised (``bitsandbytes.functional.dequantize_4bit``) in the forward and again in the
backward, never kept. Adapters are fp32 parameters; they are cast to the compute dtype per step (small).

Format: the module keeps peft's names (``<target>.base_layer`` for the frozen layer), adapters save as
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` in adapter_model.safetensors with peft's
own adapter_config.json, so ``peft.PeftModel.from_pretrained`` loads what we write and we load what
peft writes. ``lora_impl="peft"`` (``llmray.train.lora.apply_lora``) stays as the fallback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn

from llmray.config import LoraConfig

PREFIX = "base_model.model."
M = TypeVar("M", bound=nn.Module)


def _dequantize(base: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight (out, in) in ``dtype``: as stored, or dequantised from NF4."""
    w = base.weight
    if w.dtype == torch.uint8 and hasattr(w, "quant_state"):  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).to(dtype)
    return w if w.dtype == dtype else w.to(dtype)


class _LoraFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, base: nn.Linear, scale: float):  # x (N, in), a (r, in), b (out, r)
        w = _dequantize(base, x.dtype)
        h = x @ a.t()  # (N, r): the shrink
        y = torch.addmm(x @ w.t(), h, b.t(), alpha=scale)  # base + expand in one accumulate
        ctx.save_for_backward(x, a, b, h)
        ctx.base, ctx.scale = base, scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, a, b, h = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dh = (dy @ b) * ctx.scale  # (N, r)
        dx = None
        if ctx.needs_input_grad[0]:
            w = _dequantize(ctx.base, x.dtype)
            dx = torch.addmm(dy @ w, dh, a)
        da = dh.t() @ x if ctx.needs_input_grad[1] else None
        db = (dy.t() @ h) * ctx.scale if ctx.needs_input_grad[2] else None
        return dx, da, db, None, None


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (scale = alpha / r), one fused autograd node."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):  # bitsandbytes' Linear4bit is an nn.Linear too
            raise TypeError(f"LoraLinear wraps an nn.Linear or a Linear4bit, got {type(base).__name__}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.scale = r, alpha / r
        dev = next(base.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default initialisation
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2 = x.reshape(-1, shape[-1]).to(dt)
        if self.dropout is not None and self.training:  # dropout on the adapter's input only: unfused
            y = nn.functional.linear(x2, _dequantize(self.base_layer, dt))
            lora = self.dropout(x2) @ self.lora_A.to(dt).t() @ self.lora_B.to(dt).t()
            return (y + self.scale * lora).view(*shape[:-1], -1)
        with torch.autocast(dev, enabled=False):
            y = _LoraFn.apply(x2, self.lora_A.to(dt), self.lora_B.to(dt), self.base_layer, self.scale)
        return y.view(*shape[:-1], self.out_features)


def apply_lora(model: M, cfg: LoraConfig) -> M:
    """Freeze ``model`` and put a ``LoraLinear`` on every linear layer named in ``cfg.target_modules()``."""
    names = cfg.target_modules()
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names and _is_linear(m)]
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)}
    unknown = [n for n in names if n not in present]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} name no linear layer; the model has {sorted(present)}")
    for name, mod in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], LoraLinear(mod, cfg.r, cfg.alpha, cfg.dropout))
    model.lora_config = cfg  # type: ignore[assignment]  # a plain attribute (for save_adapter): nn.Module's __setattr__ is typed for tensors and modules only
    return model


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Linear4bit"


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under peft's file names (CPU, fp32, contiguous)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    return out


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (peft's names, with or without the ``.default`` adapter name) into the layers."""
    mods = lora_modules(model)
    want = set(adapter_state_keys(mods))
    got = {k.replace(".default.weight", ".weight"): v for k, v in state.items()}
    missing, unexpected = sorted(want - set(got)), sorted(set(got) - want)
    if missing or unexpected:
        raise ValueError(
            f"adapter does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    with torch.no_grad():
        for name, m in mods.items():
            m.lora_A.copy_(got[f"{PREFIX}{name}.lora_A.weight"])
            m.lora_B.copy_(got[f"{PREFIX}{name}.lora_B.weight"])


def adapter_state_keys(mods: dict[str, LoraLinear]) -> list[str]:
    return [f"{PREFIX}{n}.lora_{x}.weight" for n in mods for x in ("A", "B")]


def save_adapter(model: nn.Module, out_dir: str | Path, base_dir: str | Path | None) -> Path:
    """Write adapter_config.json (peft's own LoraConfig) + adapter_model.safetensors into ``out_dir``."""
    from safetensors.torch import save_file

    from llmray.train.lora import peft_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora_cfg = getattr(model, "lora_config", None)
    if not isinstance(lora_cfg, LoraConfig):
        raise ValueError(f"save_adapter needs a model prepared by apply_lora, got {type(model).__name__}")
    cfg = peft_config(lora_cfg)
    cfg.base_model_name_or_path = str(Path(base_dir).resolve()) if base_dir else None
    cfg.task_type = "CAUSAL_LM"
    cfg.inference_mode = True
    cfg.save_pretrained(str(out))
    conf = json.loads((out / "adapter_config.json").read_text())
    conf["auto_mapping"] = None
    (out / "adapter_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
    save_file(adapter_state(model), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def apply_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> dict[str, Any]:
    """Put the LoRA layers of a PEFT adapter directory (ours or peft's) on ``model``; returns its config."""
    from safetensors.torch import load_file

    conf = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    plain = conf.get("peft_type", "LORA") == "LORA" and conf.get("bias", "none") == "none"
    if not plain or conf.get("use_dora") or conf.get("use_rslora") or conf.get("rank_pattern"):
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters (no DoRA, rsLoRA, bias or rank pattern)")
    targets = conf["target_modules"]
    targets = sorted(targets) if isinstance(targets, list | set) else targets
    cfg = LoraConfig(r=conf["r"], alpha=conf["lora_alpha"], dropout=0.0, targets=targets)
    apply_lora(model, cfg)
    load_adapter_state(model, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
    return conf
