"""A step's inputs: built with numpy into a pinned host buffer, moved to a persistent device buffer in ONE copy.

Every step (decode-only or mixed) is described by the same int64 arrays, padded to a layout (T tokens,
S sequence slots, C prefill tiles), in this order in one flat buffer:

    ids (T) pos (T) slots (T) src (T) lora (T) | qstart (S+1) ctx (S) | tile_seq (C) tile_m (C) | last (R)
    | tables (S, width)

The fixed-size part sits at offsets that depend only on (T, S, C), so a CUDA graph captured for a layout
reads its inputs straight from the device buffer (no per-input copies); ``last`` (rows that sample) and
the block tables (``width`` columns) vary per step. Padding: token ids 0 at slot -1 (not stored), sequence
slots with no tokens (both attention kernels skip them), tiles with sequence -1. Two host buffers
alternate so building step N+1 never races the still pending copy of step N.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from llmray.engine.scheduler import ScheduledSeq

FIXED = ("ids", "pos", "slots", "src", "lora", "qstart", "ctx", "tile_seq", "tile_m")


@dataclass(frozen=True)
class Layout:
    tokens: int  # T
    seqs: int  # S
    tiles: int  # C

    def sizes(self) -> list[int]:
        t, s, c = self.tokens, self.seqs, self.tiles
        return [t, t, t, t, t, s + 1, s, c, c]

    @property
    def fixed_size(self) -> int:
        return sum(_even(n) for n in self.sizes())

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each array starts 16-byte aligned (an even offset): Triton specialises on pointer alignment."""
        out, off = {}, 0
        for name, n in zip(FIXED, self.sizes(), strict=True):
            out[name] = flat[off : off + n]
            off += _even(n)
        return out


def _even(n: int) -> int:
    return n + (n & 1)


def tile_capacity(tokens: int, seqs: int, block_m: int) -> int:
    """Most prefill tiles a step of ``tokens`` tokens over ``seqs`` sequences can need."""
    return tokens // block_m + min(seqs, tokens // 2) + 1


@dataclass
class StepBatch:
    """One built step: device views of its inputs plus what the host needs to know about it."""

    layout: Layout
    views: dict[str, torch.Tensor]  # FIXED names -> device views
    last: torch.Tensor  # (R,) device: packed index of each sampling row's last token
    tables: torch.Tensor  # (S, width) device
    num_tokens: int
    num_seqs: int
    num_decodes: int  # leading sequences with one-token chunks
    num_prefill_tiles: int
    width: int
    has_placeholders: bool
    use_lora: bool


class StepInputs:
    def __init__(
        self, device: torch.device, capacity: int, block_size: int, block_m: int, max_width: int
    ) -> None:
        self.device, self.block_size, self.block_m, self.max_width = device, block_size, block_m, max_width
        self.capacity = capacity
        pin = device.type == "cuda"
        self.host = [torch.zeros(capacity, dtype=torch.int64, pin_memory=pin) for _ in range(2 if pin else 1)]
        self.dev = torch.zeros(capacity, dtype=torch.int64, device=device)
        self._turn = 0

    def build(
        self,
        items: list[ScheduledSeq],
        sample_rows: list[int],
        layout: Layout | None,
        prev_rows: dict[int, int],
        with_lora: bool,
    ) -> StepBatch:
        """Inputs of ``items`` (one-token chunks first) padded to ``layout`` (None: exact sizes)."""
        b, bs = len(items), self.block_size
        q_lens = np.fromiter((it.num_new_tokens for it in items), np.int64, b)
        starts = np.fromiter((it.start for it in items), np.int64, b)
        cu = np.zeros(b + 1, np.int64)
        np.cumsum(q_lens, out=cu[1:])
        n = int(cu[-1])
        num_decodes = int(np.searchsorted(q_lens != 1, True))  # one-token chunks come first
        pre = np.flatnonzero(q_lens > 1)
        ntiles = -(-q_lens[pre] // self.block_m)
        c = int(ntiles.sum())
        if layout is None:
            layout = Layout(n, b, c)
        s_pad = layout.seqs
        # block-table columns rounded up to 16: Triton specialises on the row stride's divisibility, so one
        # compiled variant serves every step
        width = min(-(-max(len(it.seq.block_table) for it in items) // 16) * 16, self.max_width)
        r = len(sample_rows)
        tables_at = layout.fixed_size + _even(r)
        total = tables_at + s_pad * width
        if total > self.capacity:
            raise ValueError(f"step inputs need {total} ints; the staging buffer holds {self.capacity}")
        self._turn = (self._turn + 1) % len(self.host)
        flat = self.host[self._turn]
        hv = layout.views(flat)
        h = {k: v.numpy() for k, v in hv.items()}

        if num_decodes == b:
            ids = np.fromiter((it.seq.token_ids[it.start] for it in items), np.int64, b)
        else:
            ids = np.fromiter(
                itertools.chain.from_iterable(
                    it.seq.token_ids[it.start : it.start + it.num_new_tokens] for it in items
                ),
                np.int64,
                n,
            )
        pos = np.arange(n) - np.repeat(cu[:-1] - starts, q_lens)
        tables = flat[tables_at:total].numpy().reshape(s_pad, width)
        tables[:] = 0
        lens = np.fromiter((len(it.seq.block_table) for it in items), np.int64, b)
        chain = itertools.chain.from_iterable(it.seq.block_table for it in items)
        tables[:b][np.arange(width)[None, :] < lens[:, None]] = np.fromiter(chain, np.int64, int(lens.sum()))
        seq_of_token = np.repeat(np.arange(b), q_lens)
        h["ids"][:n] = ids
        h["ids"][n:] = 0
        h["pos"][:n] = pos
        h["pos"][n:] = 0
        h["slots"][:n] = tables[seq_of_token, pos // bs] * bs + pos % bs
        h["slots"][n:] = -1
        placeholders = np.flatnonzero(ids < 0)
        h["src"][:] = 0
        for i in placeholders.tolist():
            h["src"][i] = prev_rows[items[seq_of_token[i]].seq.seq_id]
        use_lora = False
        if with_lora:
            slots = np.fromiter((it.seq.lora_slot for it in items), np.int64, b)
            use_lora = bool((slots >= 0).any())
            h["lora"][:n] = np.repeat(slots, q_lens)
            h["lora"][n:] = -1
        h["qstart"][: b + 1] = cu
        h["qstart"][b + 1 :] = n
        h["ctx"][:b] = starts + q_lens
        h["ctx"][b:] = 0
        h["tile_seq"][:c] = np.repeat(pre, ntiles)
        h["tile_seq"][c:] = -1
        h["tile_m"][:c] = np.arange(c) - np.repeat(np.cumsum(ntiles) - ntiles, ntiles)
        h["tile_m"][c:] = 0
        flat[layout.fixed_size : layout.fixed_size + r].numpy()[:] = cu[1:][sample_rows] - 1
        self.dev[:total].copy_(flat[:total], non_blocking=True)
        dev = self.dev
        return StepBatch(
            layout=layout,
            views=layout.views(dev),
            last=dev[layout.fixed_size : layout.fixed_size + r],
            tables=dev[tables_at:total].view(s_pad, width),
            num_tokens=n,
            num_seqs=b,
            num_decodes=num_decodes,
            num_prefill_tiles=c,
            width=width,
            has_placeholders=placeholders.size > 0,
            use_lora=use_lora,
        )
