"""``LoRALinear``: a base ``nn.Linear`` plus per-row adapter deltas from device slot buffers.

Swapped in for the model's linear layers from outside (gpt-fast style); the model file knows nothing
of it. All wrapped layers share one ``LoraBatch`` whose ``slots`` tensor (one int32 per packed row,
-1 = base model) the engine writes before each forward; it is a persistent buffer so CUDA graphs
replay with the slots of the current step.

Layers that read the same input (q/k/v, gate/up) share a ``ShrinkGroup``: their A matrices are slices of
one stacked buffer, and the first member called with an input runs one shrink for all of them (x is read
once, one launch instead of three); the others reuse its output when called with the same tensor. Their B
matrices are slices of one buffer stacked along the output too, so when the model runs the members as one
fused GEMM (q|k|v, gate|up: ``Qwen3Attention.qkv_delta`` / ``Qwen3MLP.gate_up_delta`` hooks), ``fused_delta``
adds every member's delta to the fused output with one shrink and one grouped expand.
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


class ShrinkGroup:
    """Stacked A matrices of linears sharing an input: (S, G·R, K); member i owns rows [i·R, (i+1)·R).
    With ``out_features`` (one per member) also their B matrices, stacked along the output: (S, ΣO, R)."""

    def __init__(
        self,
        size: int,
        num_slots: int,
        max_rank: int,
        in_features: int,
        like: torch.Tensor,
        out_features: list[int] | None = None,
        batch: LoraBatch | None = None,
    ):
        self.size, self.rank, self.batch = size, max_rank, batch
        self.lora_a = torch.zeros(
            num_slots, size * max_rank, in_features, dtype=like.dtype, device=like.device
        )
        self.bounds = [0]  # member i's output columns in the stacked B: [bounds[i], bounds[i + 1])
        for o in out_features or []:
            self.bounds.append(self.bounds[-1] + o)
        self.lora_b = (
            torch.zeros(num_slots, self.bounds[-1], max_rank, dtype=like.dtype, device=like.device)
            if out_features
            else None
        )
        self._x: torch.Tensor | None = None  # the input of the current shrink (identity marks it)
        self._y: torch.Tensor | None = None  # its output (splits, N, G·R) fp32
        self._unread = (
            0  # members yet to read ``_y``; at 0 both are dropped (no activation outlives the step)
        )

    def member_a(self, i: int) -> torch.Tensor:
        return self.lora_a[:, i * self.rank : (i + 1) * self.rank]  # (S, R, K) view

    def member_b(self, i: int) -> torch.Tensor | None:
        if self.lora_b is None:
            return None
        return self.lora_b[:, self.bounds[i] : self.bounds[i + 1]]  # (S, O_i, R) view

    def fused_delta(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (..., ΣO) += every member's delta: the fused projection of x (..., K) (model hook)."""
        batch = self.batch
        assert batch is not None and self.lora_b is not None, "a fused group has its batch and stacked B"
        if not batch.enabled:
            return
        flat_x = x.reshape(-1, x.shape[-1])
        flat_out = out.view(-1, out.shape[-1])
        slots = batch.slots[: flat_x.shape[0]]
        if x.is_cuda or LoRALinear.use_kernels_on_cpu:
            y = lora_shrink(flat_x, self.lora_a, slots, batch.scales)  # (splits, N, G·R)
            seg = tuple(self.bounds[1:-1])
            if all(b % 128 == 0 for b in seg):  # the grouped expand's output tiles never straddle members
                lora_expand(y, self.lora_b, slots, flat_out, seg=seg)
                return
            for i in range(self.size):
                lo, hi, r = self.bounds[i], self.bounds[i + 1], self.rank
                lora_expand(y[..., i * r : (i + 1) * r], self.lora_b[:, lo:hi], slots, flat_out[:, lo:hi])
            return
        for i in range(self.size):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            delta = lora_delta_ref(flat_x, self.member_a(i), self.lora_b[:, lo:hi], slots, batch.scales)
            flat_out[:, lo:hi] += delta.to(flat_out.dtype)

    def shrink(self, x: torch.Tensor, flat_x: torch.Tensor, batch: LoraBatch, i: int) -> torch.Tensor:
        """y (splits, N, R) of member ``i`` for the input ``x`` (rows flat_x (N, K)); one shrink per input."""
        if self._x is not x:
            self._x, self._unread = x, self.size
            self._y = lora_shrink(flat_x, self.lora_a, batch.slots[: flat_x.shape[0]], batch.scales)
        assert self._y is not None, "the current input's shrink is kept until every member has read it"
        y = self._y[..., i * self.rank : (i + 1) * self.rank]
        self._unread -= 1
        if self._unread == 0:
            self._x = self._y = None
        return y


class LoRALinear(nn.Module):
    use_kernels_on_cpu = False  # tests set it (with TRITON_INTERPRET=1) to run the Triton path on the CPU
    lora_b: torch.Tensor  # (S, out, R) buffer, registered in __init__

    def __init__(
        self,
        base: nn.Linear,
        num_slots: int,
        max_rank: int,
        batch: LoraBatch,
        group: ShrinkGroup | None = None,
        index: int = 0,
    ) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        w = base.weight
        if group is None:
            group = ShrinkGroup(1, num_slots, max_rank, base.in_features, w)
        self.group, self.index = group, index
        self.lora_a = group.member_a(index)  # (S, R, in) view into the group's stacked buffer
        b = group.member_b(index)  # (S, out, R) view into the group's stacked B, or a buffer of its own
        if b is None:
            b = torch.zeros(num_slots, base.out_features, max_rank, dtype=w.dtype, device=w.device)
        self.register_buffer("lora_b", b)

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
        if x.is_cuda or self.use_kernels_on_cpu:
            y = self.group.shrink(x, flat_x, self.batch, self.index)
            lora_expand(y, self.lora_b, slots, flat_out)
        else:
            delta = lora_delta_ref(flat_x, self.lora_a, self.lora_b, slots, self.batch.scales)
            flat_out += delta.to(flat_out.dtype)
        return out
