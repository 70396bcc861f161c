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
peft writes. ``lora_impl="peft"`` (``llmray.train.peft_adapters.apply_lora``) stays as the fallback.
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


class _LoraGroupFn(torch.autograd.Function):
    """y_i = x W_i^T + s (x A_i^T) B_i^T for the layers i that read one x: one shrink, one autograd node."""

    @staticmethod
    def forward(ctx, x, scale: float, bases: tuple, ranks: list[int], *ab):
        # x (N, in) in the compute dtype; ab = (A_1, B_1, A_2, B_2, ...): fp32 A_i (r_i, in), B_i (out_i, r_i)
        dt = x.dtype
        a = (torch.cat(ab[0::2]) if len(bases) > 1 else ab[0]).to(dt)  # (R, in), R = sum r_i
        sbs = [(b * scale).to(dt) for b in ab[1::2]]  # s B_i (out_i, r_i)
        h = x @ a.t()  # (N, R): the shrink of every layer at once
        ys = []
        for base, sb, hi in zip(bases, sbs, h.split(ranks, dim=1), strict=True):
            y = x @ _dequantize(base, dt).t()
            ys.append(y.addmm_(hi, sb.t()))  # base + expand, accumulated in place
        ctx.save_for_backward(x, a, h, *sbs)
        ctx.bases, ctx.scale, ctx.ranks = bases, scale, ranks
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        x, a, h, *sbs = ctx.saved_tensors
        dys_x = [dy.to(x.dtype) for dy in dys]  # the incoming grads in the activations' dtype
        dys = tuple(dys_x)
        dh = (
            torch.cat([dy @ sb for dy, sb in zip(dys, sbs, strict=True)], 1)
            if len(dys) > 1
            else dys[0] @ sbs[0]
        )
        dx: torch.Tensor | None = None
        if ctx.needs_input_grad[0]:
            for base, dy in zip(ctx.bases, dys, strict=True):
                w = _dequantize(base, x.dtype)
                dx = dy @ w if dx is None else dx.addmm_(dy, w)
            assert dx is not None  # a group has at least one member
            dx.addmm_(dh, a)
        grads: list[torch.Tensor | None] = []
        das = (dh.t() @ x).float().split(ctx.ranks) if any(ctx.needs_input_grad[4::2]) else None
        for i, (dy, hi) in enumerate(zip(dys, h.split(ctx.ranks, dim=1), strict=True)):
            grads.append(das[i] if das is not None else None)
            grads.append((dy.t() @ hi).float().mul_(ctx.scale) if ctx.needs_input_grad[5 + 2 * i] else None)
        return dx, None, None, None, *grads


class _Group:
    """Sibling LoRA layers that read one input (q/k/v, gate/up): the first call computes every member's
    output in one ``_LoraGroupFn`` (one shrink GEMM for all), the siblings' calls with the same input
    tensor take theirs. A call with another input while outputs are pending means the siblings do not
    share their input: the group is switched off and each layer computes alone from then on."""

    def __init__(self, members: list[LoraLinear]) -> None:
        self.members = members
        self.shared = True
        self._x: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def output(self, member: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        if not self.shared:
            return _run([member], x)[0]
        if self._x is not x or id(member) not in self._pending:
            if self._pending:  # a sibling's output was never taken: not one shared input
                self.shared, self._x, self._pending = False, None, {}
                return _run([member], x)[0]
            self._x = x
            self._pending = dict(zip((id(m) for m in self.members), _run(self.members, x), strict=True))
        y = self._pending.pop(id(member))
        if not self._pending:
            self._x = None
        return y


def _run(members: list[LoraLinear], x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of ``members`` (one scale, one input x (..., in)) through one autograd node."""
    shape, dev = x.shape, x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    x2 = x.reshape(-1, shape[-1]).to(dt)
    ab = [t for m in members for t in (m.lora_A, m.lora_B)]
    bases = tuple(m.base_layer for m in members)
    with torch.autocast(dev, enabled=False):
        ys = _LoraGroupFn.apply(x2, members[0].scale, bases, [m.r for m in members], *ab)
    return [y.view(*shape[:-1], m.out_features) for y, m in zip(ys, members, strict=True)]


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
        self.group: _Group | None = None  # siblings sharing this layer's input (set by apply_lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None and self.training:  # dropout on the adapter's input only: unfused
            shape, dev = x.shape, x.device.type
            dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            x2 = x.reshape(-1, shape[-1]).to(dt)
            y = nn.functional.linear(x2, _dequantize(self.base_layer, dt))
            lora = self.dropout(x2) @ self.lora_A.to(dt).t() @ self.lora_B.to(dt).t()
            return (y + self.scale * lora).view(*shape[:-1], -1)
        if self.group is not None:
            return self.group.output(self, x)
        return _run([self], x)[0]


GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Qwen3's layers that share an input


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
    parents: dict[str, nn.Module] = {}
    for name, mod in targets:
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parents[parent_name] = parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, name.rsplit(".", 1)[-1], LoraLinear(mod, cfg.r, cfg.alpha, cfg.dropout))
    for parent in parents.values():
        for group_names in GROUPS:
            members = [m for n in group_names if isinstance(m := getattr(parent, n, None), LoraLinear)]
            if len(members) > 1:
                group = _Group(members)
                for m in members:
                    m.group = group
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

    from llmray.train.peft_adapters import peft_config

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
