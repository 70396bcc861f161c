"""``LoRALinear``: a base ``nn.Linear`` plus per-row adapter deltas from device slot buffers.

Swapped in for the model's linear layers from outside (gpt-fast style); the model file knows nothing
of it. All wrapped layers share one ``LoraBatch`` whose ``slots`` tensor (one int32 per packed row,
-1 = base model) the engine writes before each forward; it is a persistent buffer so CUDA graphs
replay with the slots of the current step.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmray.kernels.lora import lora_delta_ref, lora_expand, lora_shrink


class LoraBatch:
    """Per-step adapter assignment shared by every LoRALinear of one model."""

    def __init__(self, max_rows: int, num_slots: int, device: torch.device) -> None:
        self.slots = torch.full((max_rows,), -1, dtype=torch.int32, device=device)  # (max_rows,)
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)  # alpha / r per slot
        self.enabled = False  # False: no row of this step uses an adapter (skip the LoRA kernels)

    def set_rows(self, row_slots: torch.Tensor) -> None:
        """row_slots (N,) int32 for the packed rows of this step; rows past N are reset to -1."""
        n = row_slots.numel()
        if n > self.slots.numel():
            raise ValueError(f"{n} rows exceed the LoRA batch capacity {self.slots.numel()}")
        self.slots[:n].copy_(row_slots, non_blocking=True)
        self.slots[n:].fill_(-1)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, num_slots: int, max_rank: int, batch: LoraBatch) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        w = base.weight
        self.register_buffer(
            "lora_a", torch.zeros(num_slots, max_rank, base.in_features, dtype=w.dtype, device=w.device)
        )
        self.register_buffer(
            "lora_b", torch.zeros(num_slots, base.out_features, max_rank, dtype=w.dtype, device=w.device)
        )

    @property
    def weight(self) -> torch.Tensor:  # so code that reads .weight (tied heads, dtype checks) still works
        return self.base.weight

    def load_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Copy A (r, in) and B (out, r) into ``slot``, zero-padding to max_rank (None clears the slot)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if a is not None and b is not None:
            r = a.shape[0]
            self.lora_a[slot, :r].copy_(a)
            self.lora_b[slot, :, :r].copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        out = self.base(x)
        if not self.batch.enabled:
            return out
        flat_x = x.reshape(-1, x.shape[-1])
        flat_out = out.view(-1, out.shape[-1])
        slots = self.batch.slots[: flat_x.shape[0]]
        if x.is_cuda:
            y = lora_shrink(flat_x, self.lora_a, slots, self.batch.scales)  # (splits, N, R) fp32
            lora_expand(y, self.lora_b, slots, flat_out)
        else:
            delta = lora_delta_ref(flat_x, self.lora_a, self.lora_b, slots, self.batch.scales)
            flat_out += delta.to(flat_out.dtype)
        return out
