"""``LoRALinear``: a base ``nn.Linear`` plus per-row adapter deltas from device slot buffers.

Swapped in for the model's linear layers from outside (gpt-fast style); the model file knows nothing
of it. All wrapped layers share one ``LoraBatch`` whose ``slots`` tensor (one int32 per packed row,
-1 = base model) the engine writes before each forward; it is a persistent buffer so CUDA graphs
replay with the slots of the current step.

Each GEMM site (the linears reading one input: q|k|v, gate|up; o; down) has a ``ShrinkGroup``: the A
matrices stacked (one shrink reads x once for all members) and the B matrices laid out so that the model's
fused q|k|v and gate|up GEMMs stay on with adapters (its ``qkv_linear`` / ``gate_up_linear`` hooks call
``ShrinkGroup.linear``). Where G·S·R <= K (members x slots x max rank vs the input width) B lives next to
the base weight, ``[W | B]`` (the "wide" layout): a LoRA step runs one shrink that writes ``[x | y]`` (y
block-sparse: each row's adapter activations in its slot's columns, zeros elsewhere) and ONE GEMM, so the
adapters cost a small kernel and a slightly wider GEMM instead of a shrink, an expand and a read-modify-write
of the output per projection. Otherwise (and outside ``LoraBatch.wide_min_rows..wide_max_rows`` rows: the
wide shrink is latency-bound at decode sizes, where the split kernels are faster) the split path runs:
the base GEMM, then ``lora_shrink`` + a grouped ``lora_expand`` adding every member's delta in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmray.kernels.lora import lora_delta_ref, lora_expand, lora_shrink, lora_wide_shrink
from llmray.kernels.lora_fused import lora_delta, lora_delta_supported
from llmray.kernels.lora_tall import lora_tall_expand, lora_tall_expand_swiglu


class LoraBatch:
    """Per-step adapter assignment shared by every LoRALinear of one model."""

    def __init__(self, max_rows: int, num_slots: int, device: torch.device) -> None:
        self.slots = torch.full((max_rows,), -1, dtype=torch.int32, device=device)  # (max_rows,)
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)  # alpha / r per slot
        self.enabled = False  # False: no row of this step uses an adapter (skip the LoRA kernels)
        # steps of wide_min_rows..wide_max_rows rows run a wide group's one-GEMM path, others the split kernels.
        # H200, qwen3-0.6b, 16 adapters (bench/lora_profile.py micro): at 256 rows the split kernels are faster
        # (1.58 vs 1.77 ms a forward: the wide shrink is latency-bound), at 8192 rows the wide path (16.5 vs 18.5)
        # off by default: W3's GPU test of the wide GEMM at 8192 rows (64-row tiles) found wrong values in ~2k of
        # 33M outputs, not yet understood; benches set wide_min_rows to try it
        self.wide_min_rows = 1 << 30
        self.wide_max_rows = 1 << 30
        # steps of at most fused_max_rows rows add each projection's deltas in ONE launch after the base GEMM
        # where lora_fused has a config for the size (decode; lora_fused.CONFIGS), instead of a shrink and an
        # expand (0: always the split kernels, for A/B)
        self.fused_max_rows = 1 << 30
        # steps of at most tall_max_rows rows run a tall group's one GEMM over [W ; A] (the shrink of every slot
        # folded into the base GEMM) + one expand kernel, instead of GEMM + shrink + expand (0: split, for A/B)
        self.tall_max_rows = 1 << 30
        # tall gate|up: the expand and the gated SwiGLU in one launch (the model's ``gate_up_act`` hook)
        self.fuse_swiglu = True

    def set_rows(self, row_slots: torch.Tensor) -> None:
        """row_slots (N,) int32 for the packed rows of this step; rows past N are reset to -1."""
        n = row_slots.numel()
        if n > self.slots.numel():
            raise ValueError(f"{n} rows exceed the LoRA batch capacity {self.slots.numel()}")
        self.slots[:n].copy_(row_slots, non_blocking=True)
        self.slots[n:].fill_(-1)


class ShrinkGroup:
    """The LoRA state of one GEMM site: ``weights`` are the base weights (O_i, K) of the linears reading the
    same input (q/k/v, gate/up; or one linear). A matrices stacked: (S, G·R, K), member i owns rows
    [i·R, (i+1)·R). B: member i's (S, O_i, R) is ``member_b(i)``, laid out one of two ways:
    - "wide" (when G·S·R <= K): ``w_ext`` (ΣO, K + G·S·R) = [W | B of member 0 | ... ], member i's B in its
      own output rows (O_i, S·R), zero elsewhere; ``w_ext[:, :K]`` IS the base weight the model uses. A LoRA
      step then runs one shrink (``lora_wide_shrink``: xy = [x | y]) and ONE GEMM ``xy @ w_ext.T``.
    - stacked: ``lora_b`` (S, ΣO, R); the deltas are added to the base GEMM's output by ``lora_expand``.
    Either way the split path (``lora_shrink`` + ``lora_expand``) can run on it (wide: above
    ``LoraBatch.wide_min_rows..wide_max_rows`` rows, or when the model's weight is not ``w_ext``'s)."""

    def __init__(
        self,
        weights: list[torch.Tensor],
        num_slots: int,
        max_rank: int,
        batch: LoraBatch | None = None,
        wide: bool | None = None,
        tall: bool = False,
    ):
        like = weights[0]
        k = like.shape[1]
        self.size, self.rank, self.slots, self.in_features, self.batch = (
            len(weights),
            max_rank,
            num_slots,
            k,
            batch,
        )
        self.bounds = [0]  # member i's output columns: [bounds[i], bounds[i + 1])
        for w in weights:
            self.bounds.append(self.bounds[-1] + w.shape[0])
        width = self.size * num_slots * max_rank
        self.w_ext: torch.Tensor | None = None
        self.w_cat: torch.Tensor | None = None  # tall: [W ; A] (ΣO + S·G·R, K)
        self.lora_b: torch.Tensor | None = None
        if tall:
            o = self.bounds[-1]
            self.w_cat = torch.zeros(o + width, k, dtype=like.dtype, device=like.device)
            with torch.no_grad():
                for lo, hi, w in zip(self.bounds[:-1], self.bounds[1:], weights, strict=True):
                    self.w_cat[lo:hi].copy_(w)
            self.lora_a = self.w_cat[o:].view(num_slots, self.size * max_rank, k)  # (S, G·R, K) view
            self.lora_b = torch.zeros(num_slots, o, max_rank, dtype=like.dtype, device=like.device)
            return
        self.lora_a = torch.zeros(num_slots, self.size * max_rank, k, dtype=like.dtype, device=like.device)
        if wide if wide is not None else width <= k:
            self.w_ext = torch.zeros(self.bounds[-1], k + width, dtype=like.dtype, device=like.device)
            with torch.no_grad():
                for lo, hi, w in zip(self.bounds[:-1], self.bounds[1:], weights, strict=True):
                    self.w_ext[lo:hi, :k].copy_(w)
        else:
            self.lora_b = torch.zeros(
                num_slots, self.bounds[-1], max_rank, dtype=like.dtype, device=like.device
            )

    # the input of the current shrink (identity marks it), its output (splits, N, G·R) fp32, and the members yet
    # to read it (at 0 both are dropped: no activation outlives the step)
    _x: torch.Tensor | None = None
    _y: torch.Tensor | None = None
    _unread = 0

    @property
    def weight(self) -> torch.Tensor | None:
        """The base weight (ΣO, K) as a view of ``w_ext`` (wide) or ``w_cat`` (tall), for the model's GEMM;
        None otherwise."""
        if self.w_cat is not None:
            return self.w_cat[: self.bounds[-1]]
        return None if self.w_ext is None else self.w_ext[:, : self.in_features]

    def _tall_block_o(self) -> int:
        """Output tile width of the tall expand (member boundaries must not straddle a tile); 0: none fits."""
        seg = self.bounds[1:-1]
        return next((b for b in (128, 64, 32, 16) if all(c % b == 0 for c in seg)), 0)

    def member_a(self, i: int) -> torch.Tensor:
        return self.lora_a[:, i * self.rank : (i + 1) * self.rank]  # (S, R, K) view

    def member_b(self, i: int) -> torch.Tensor:
        lo, hi, s, r = self.bounds[i], self.bounds[i + 1], self.slots, self.rank
        if self.w_ext is None:
            assert self.lora_b is not None, "a group has either w_ext or lora_b"
            return self.lora_b[:, lo:hi]  # (S, O_i, R) view
        c = self.in_features + i * s * r
        return self.w_ext[lo:hi, c : c + s * r].view(hi - lo, s, r).permute(1, 0, 2)  # (S, O_i, R) strided

    def _stacked_b(self) -> tuple[torch.Tensor, int]:
        """(S, ΣO, R) B of member 0's layout and the offset of member i+1's B from member i's (elements)."""
        if self.w_ext is None:
            assert self.lora_b is not None, "a group has either w_ext or lora_b"
            return self.lora_b, 0
        k, sr = self.in_features, self.slots * self.rank
        return self.w_ext[:, k : k + sr].view(-1, self.slots, self.rank).permute(1, 0, 2), sr

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., ΣO): the projection with base ``weight`` (ΣO, K) plus every row's adapter delta
        (the model's fused q|k|v / gate|up hook, and ``LoRALinear`` of a one-member group)."""
        batch = self.batch
        assert batch is not None, "a group used as a projection has its batch"
        if not batch.enabled:
            return F.linear(x, weight)
        flat_x = x.reshape(-1, x.shape[-1])
        n = flat_x.shape[0]
        kernels = x.is_cuda or LoRALinear.use_kernels_on_cpu
        w_cat = self.w_cat
        if self._tall_ok(x, n, weight):
            assert w_cat is not None and self.lora_b is not None, "a tall group has [W ; A] and its B"
            full = F.linear(flat_x, w_cat)  # (N, ΣO + S·G·R): the base projection and every slot's shrink
            seg = tuple(self.bounds[1:-1])
            out = lora_tall_expand(
                full, self.lora_b, batch.slots[:n], batch.scales, self.size, seg, self._tall_block_o()
            )
            return out.view(*x.shape[:-1], self.bounds[-1])
        w_ext = self.w_ext
        if (
            kernels
            and w_ext is not None
            and batch.wide_min_rows <= n <= batch.wide_max_rows
            and weight.data_ptr() == w_ext.data_ptr()
        ):
            xy = lora_wide_shrink(flat_x, self.lora_a, batch.slots[:n], batch.scales, self.size)
            return F.linear(xy, w_ext).view(*x.shape[:-1], w_ext.shape[0])  # (N, K + G·S·R) x (ΣO, ...)ᵀ
        out = F.linear(x, weight)
        self.add_delta(x, out)
        return out

    def _tall_ok(self, x: torch.Tensor, n: int, weight: torch.Tensor) -> bool:
        """Whether a step of ``n`` rows runs this group's tall GEMM + expand."""
        batch, w_cat = self.batch, self.w_cat
        return (
            batch is not None
            and batch.enabled
            and (x.is_cuda or LoRALinear.use_kernels_on_cpu)
            and w_cat is not None
            and n <= batch.tall_max_rows
            and weight.data_ptr() == w_cat.data_ptr()
            and self._tall_block_o() > 0
        )

    def gate_up_act(
        self, x: torch.Tensor, weight: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """x (..., K) -> act(x @ [gate | up]ᵀ + deltas) (..., I): the model's ``gate_up_act`` hook. On the tall
        path with ``LoraBatch.fuse_swiglu`` the expand and the gated SwiGLU run as one kernel (``act`` is then
        not called: it is the gated SwiGLU)."""
        flat_x = x.reshape(-1, x.shape[-1])
        batch = self.batch
        if (
            self.size == 2
            and batch is not None
            and batch.fuse_swiglu
            and self._tall_ok(x, flat_x.shape[0], weight)
        ):
            assert self.w_cat is not None and self.lora_b is not None, "a tall group has [W ; A] and its B"
            full = F.linear(flat_x, self.w_cat)  # (N, 2I + S·2·R)
            out = lora_tall_expand_swiglu(full, self.lora_b, batch.slots[: flat_x.shape[0]], batch.scales)
            return out.view(*x.shape[:-1], out.shape[-1])
        return act(self.linear(x, weight))

    def add_delta(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (..., ΣO) += every member's delta for x (..., K) (the split path: shrink + grouped expand)."""
        batch = self.batch
        assert batch is not None, "a group used as a projection has its batch"
        if not batch.enabled:
            return
        flat_x = x.reshape(-1, x.shape[-1])
        flat_out = out.view(-1, out.shape[-1])
        slots = batch.slots[: flat_x.shape[0]]
        if x.is_cuda or LoRALinear.use_kernels_on_cpu:
            seg = tuple(self.bounds[1:-1])
            n, o = flat_out.shape
            if n <= batch.fused_max_rows and lora_delta_supported(n, o, flat_x.shape[1], seg):
                b, member_stride = self._stacked_b()  # decode: shrink + expand in one launch
                lora_delta(flat_x, self.lora_a, b, slots, batch.scales, flat_out, seg, member_stride)
                return
            y = lora_shrink(flat_x, self.lora_a, slots, batch.scales)  # (splits, N, G·R)
            # prefill sizes: 256-column expand tiles (H200, 8192 rows: 17.0 vs 18.5 ms a forward; slower at 256)
            block_o = 256 if n > 1024 and all(b % 256 == 0 for b in seg) else 128
            if all(b % block_o == 0 for b in seg):  # the grouped expand's output tiles never straddle members
                b, member_stride = self._stacked_b()
                lora_expand(y, b, slots, flat_out, seg=seg, block_o=block_o, member_stride=member_stride)
                return
            for i in range(self.size):
                lo, hi, r = self.bounds[i], self.bounds[i + 1], self.rank
                lora_expand(y[..., i * r : (i + 1) * r], self.member_b(i), slots, flat_out[:, lo:hi])
            return
        for i in range(self.size):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            delta = lora_delta_ref(flat_x, self.member_a(i), self.member_b(i), slots, batch.scales)
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
    lora_b: torch.Tensor  # (S, out, R) view into the group's B, registered in __init__

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
        if group is None:
            group = ShrinkGroup([base.weight.detach()], num_slots, max_rank, batch)
        if group.size == 1 and group.weight is not None and type(base) is nn.Linear:
            # the wide layout: the base weight becomes the first K columns of the group's [W | B]
            base.weight = nn.Parameter(group.weight, requires_grad=base.weight.requires_grad)
        self.base = base
        self.batch = batch
        self.group, self.index = group, index
        self.lora_a = group.member_a(index)  # (S, R, in) view into the group's stacked buffer
        self.register_buffer("lora_b", group.member_b(index))  # (S, out, R) view into the group's B

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
        if self.group.size == 1 and self.batch.enabled and type(self.base) is nn.Linear:
            return self.group.linear(x, self.base.weight)  # (wide: one GEMM with the deltas)
        out = self.base(x)
        if not self.batch.enabled:
            return out
        flat_x = x.reshape(-1, x.shape[-1])
        flat_out = out.view(-1, out.shape[-1])
        slots = self.batch.slots[: flat_x.shape[0]]
        if x.is_cuda or self.use_kernels_on_cpu:  # a member of a q/k/v or gate/up group run unfused
            y = self.group.shrink(x, flat_x, self.batch, self.index)
            lora_expand(y, self.lora_b, slots, flat_out)
        else:
            delta = lora_delta_ref(flat_x, self.lora_a, self.lora_b, slots, self.batch.scales)
            flat_out += delta.to(flat_out.dtype)
        return out
