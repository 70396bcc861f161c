"""Writing real PEFT LoRA adapters for tests (peft on our own model; the saved format is peft's)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

ATTN = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(model, path: str | Path, targets: list[str], r: int, alpha: int, seed: int, std=0.2):
    """Save a peft LoRA adapter for ``model`` with random (non-zero) B matrices; returns the peft model."""
    import peft

    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)
    pm.save_pretrained(str(path))
    return pm.eval()
