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
from dataclasses import dataclass, field

import numpy as np
import torch

from llmray.engine.scheduler import ScheduledSeq
from llmray.engine.sequence import Sequence

FIXED = ("ids", "pos", "slots", "src", "lora", "qstart", "ctx", "tile_seq", "tile_m")


@dataclass(frozen=True)
class Layout:
    tokens: int  # T
    seqs: int  # S
    tiles: int  # C
    fixed_size: int = field(init=False, compare=False, repr=False)  # ints before ``last``

    def __post_init__(self) -> None:  # (read per step: computed once)
        object.__setattr__(self, "fixed_size", sum(_even(n) for n in self.sizes()))

    def sizes(self) -> list[int]:
        t, s, c = self.tokens, self.seqs, self.tiles
        return [t, t, t, t, t, s + 1, s, c, c]

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each array starts 16-byte aligned (an even offset): Triton specialises on pointer alignment."""
        out, off = {}, 0
        for name, n in zip(FIXED, self.sizes(), strict=True):
            out[name] = flat[off : off + n]
            off += _even(n)
        return out


def _even(n: int) -> int:
    return n + (n & 1)


def tables_offset(layout: Layout, rows: int) -> int:
    """Where the block tables start: after the fixed part and ``last`` (``rows`` sampling rows). A one-sequence
    layout (r <= 1) always reserves two ints for ``last``, so its table row sits at a fixed offset: its CUDA
    graphs read it in place (no table copy per replay)."""
    return layout.fixed_size + (2 if layout.seqs == 1 else _even(rows))


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


class BlockTableRows:
    """Every live sequence's block table as a row of one persistent host array, updated incrementally.

    The block manager only appends to a sequence's ``block_table`` list or replaces the list (allocate,
    free), so a step writes just the blocks added since the sequence's last step, and rewrites a row whose
    list object changed (the row keeps a reference to the list it mirrors, so identity is reliable)."""

    def __init__(self, width: int, rows: int = 64) -> None:
        self.width = width
        self.table = np.zeros((rows, width), np.int64)
        self.free = list(range(rows - 1, -1, -1))

    def take(self) -> int:
        if not self.free:
            n = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.free = list(range(2 * n - 1, n - 1, -1))
        return self.free.pop()

    def release(self, seq: Sequence) -> None:
        if seq.table_row >= 0:
            self.free.append(seq.table_row)
        seq.table_row, seq.table_list, seq.table_len = -1, None, 0

    def sync(self, seq: Sequence) -> int:
        """The sequence's row, brought up to date with its block table."""
        row = seq.table_row
        if row < 0:
            row = seq.table_row = self.take()
            seq.table_list = None
        bt = seq.block_table
        n = len(bt)
        if seq.table_list is not bt or n < seq.table_len:
            seq.table_list, seq.table_len = bt, 0
            self.table[row] = 0
        k = seq.table_len
        if n != k:
            self.table[row, k:n] = bt[k:]
            seq.table_len = n
        return row


class StepInputs:
    def __init__(
        self, device: torch.device, capacity: int, block_size: int, block_m: int, max_width: int
    ) -> None:
        self.device, self.block_size, self.block_m, self.max_width = device, block_size, block_m, max_width
        self.capacity = capacity
        pin = device.type == "cuda"
        self.host = [torch.zeros(capacity, dtype=torch.int64, pin_memory=pin) for _ in range(2 if pin else 1)]
        self.host_np = [h.numpy() for h in self.host]  # (numpy views: no torch op per step to reach them)
        self.dev = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.rows = BlockTableRows(max_width)
        self._turn = 0
        self._views: dict[tuple[int, Layout], dict] = {}  # (host turn | -1 = device, layout) -> views
        # (layout, sampling rows, table width) -> device (views, last, tables): no torch slicing per step
        self._shipped: dict[tuple[Layout, int, int], tuple[dict, torch.Tensor, torch.Tensor]] = {}
        self._templates: dict[tuple[Layout, bool], np.ndarray] = {}  # see _template
        self._copies: dict[
            tuple[int, int], tuple[torch.Tensor, torch.Tensor]
        ] = {}  # (turn, total) -> dst, src

    def _host_views(self, turn: int, layout: Layout) -> dict[str, np.ndarray]:
        views = self._views.get((turn, layout))
        if views is None:
            if len(self._views) > 256:  # eager steps have exact layouts: keep the cache bounded
                self._views.clear()
            views = {k: v.numpy() for k, v in layout.views(self.host[turn]).items()}
            self._views[(turn, layout)] = views
        return views

    def _dev_views(self, layout: Layout) -> dict[str, torch.Tensor]:
        views = self._views.get((-1, layout))
        if views is None:
            views = self._views[(-1, layout)] = layout.views(self.dev)
        return views

    def build(
        self, items: list[ScheduledSeq], sample_rows: list[int], layout: Layout | None, with_lora: bool
    ) -> StepBatch:
        """Inputs of ``items`` (one-token chunks first) padded to ``layout`` (None: exact sizes).

        A placeholder token (-1) of a sequence reads the token its latest launch sampled, row
        ``seq.sample_row`` of the runner's prev_tokens, on the device."""
        if len(items) == 1:
            return self._build_one(items[0], sample_rows, layout, with_lora)
        return self._build_many(items, sample_rows, layout, with_lora)

    def _stage(self, layout: Layout, r: int, width: int) -> tuple[int, int, np.ndarray, dict]:
        """Switch host buffers: (tables offset, total ints, the flat host array, its views at ``layout``)."""
        tables_at = tables_offset(layout, r)
        total = tables_at + layout.seqs * width
        if total > self.capacity:
            raise ValueError(f"step inputs need {total} ints; the staging buffer holds {self.capacity}")
        self._turn = (self._turn + 1) % len(self.host)
        return tables_at, total, self.host_np[self._turn], self._host_views(self._turn, layout)

    def _ship(
        self, layout: Layout, r: int, width: int, total: int
    ) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """One host->device copy of the step's ints; the device views (fixed arrays, ``last``, tables)."""
        pair = self._copies.get((self._turn, total))
        if pair is None:
            if len(self._copies) > 256:
                self._copies.clear()
            pair = self._copies[(self._turn, total)] = (self.dev[:total], self.host[self._turn][:total])
        pair[0].copy_(pair[1], non_blocking=True)
        key = (layout, r, width)
        got = self._shipped.get(key)
        if got is None:
            if len(self._shipped) > 256:  # (eager steps: exact layouts)
                self._shipped.clear()
            dev, at = self.dev, layout.fixed_size
            tables_at = tables_offset(layout, r)
            got = self._shipped[key] = (
                self._dev_views(layout),
                dev[at : at + r],
                dev[tables_at : tables_at + layout.seqs * width].view(layout.seqs, width),
            )
        return got

    def _template(self, layout: Layout, with_lora: bool) -> np.ndarray:
        """The fixed part of a one-sequence step with no tokens (padding everywhere), copied in first."""
        key = (layout, with_lora)
        tmpl = self._templates.get(key)
        if tmpl is None:
            if len(self._templates) > 64:  # (eager steps: exact layouts)
                self._templates.clear()
            tmpl = np.zeros(layout.fixed_size, np.int64)
            h = {k: v.numpy() for k, v in layout.views(torch.from_numpy(tmpl)).items()}
            h["slots"][:] = -1
            if with_lora:
                h["lora"][:] = -1
            h["tile_seq"][:] = -1
            self._templates[key] = tmpl
        return tmpl

    def _build_one(
        self, it: ScheduledSeq, sample_rows: list[int], layout: Layout | None, with_lora: bool
    ) -> StepBatch:
        """``build`` for a one-sequence step (a request's first chunk, a lone stream's decode): the same
        buffer contents from a padded template and slice writes (the general path's per-array numpy calls
        are most of a lone request's input time, which the device waits for)."""
        seq, n, start, bs = it.seq, it.num_new_tokens, it.start, self.block_size
        bt = seq.block_table
        row = seq.table_row if seq.table_list is bt and len(bt) == seq.table_len else self.rows.sync(seq)
        c = -(-n // self.block_m) if n > 1 else 0
        if layout is None:
            layout = Layout(n, 1, c)
        width = min(-(-max(seq.table_len, 1) // 16) * 16, self.max_width)
        r = len(sample_rows)
        tables_at, total, flat_np, h = self._stage(layout, r, width)
        fixed = layout.fixed_size
        flat_np[:fixed] = self._template(layout, with_lora)
        tables = flat_np[tables_at:total].reshape(layout.seqs, width)
        table = tables[0]
        table[:] = self.rows.table[row, :width]
        if layout.seqs > 1:
            tables[1:] = 0
        ids, pos, slots = h["ids"], h["pos"], h["slots"]
        tokens = seq.token_ids
        if n == 1:
            tok = tokens[start]
            ids[0] = tok
            pos[0] = start
            slots[0] = table[start // bs] * bs + start % bs
            has_placeholders = tok < 0
            if has_placeholders:
                h["src"][0] = seq.sample_row
        else:
            chunk = tokens[start : start + n]
            ids[:n] = chunk
            p = np.arange(start, start + n)
            pos[:n] = p
            blk, off = np.divmod(p, bs)
            slots[:n] = table[blk] * bs + off
            has_placeholders = chunk[-1] < 0  # (placeholders are a suffix of token_ids: samples in flight)
            if has_placeholders:
                placeholder = ids[:n] < 0
                h["src"][:n][placeholder] = seq.sample_row
        if has_placeholders and seq.sample_row < 0:
            raise RuntimeError("a placeholder token of a sequence that no launch sampled")
        if with_lora:
            h["lora"][:n] = seq.lora_slot
        h["qstart"][1:] = n
        h["ctx"][0] = start + n
        if c:
            h["tile_seq"][:c] = 0
            if c > 1:
                h["tile_m"][:c] = np.arange(c)
        if r:
            flat_np[fixed : fixed + r] = n - 1  # (sample_rows == [0])
        views, last, dev_tables = self._ship(layout, r, width, total)
        return StepBatch(
            layout=layout,
            views=views,
            last=last,
            tables=dev_tables,
            num_tokens=n,
            num_seqs=1,
            num_decodes=1 if n == 1 else 0,
            num_prefill_tiles=c,
            width=width,
            has_placeholders=bool(has_placeholders),
            use_lora=with_lora and seq.lora_slot >= 0,
        )

    def _build_many(
        self,
        items: list[ScheduledSeq],
        sample_rows: list[int],
        layout: Layout | None,
        with_lora: bool,
    ) -> StepBatch:
        b, bs = len(items), self.block_size
        # one pass over the items (the per-step Python cost): chunk sizes, starts, table rows, the token of
        # each one-token chunk and where its placeholder comes from
        sync = self.rows.sync
        q_list, start_list, row_list, src_list, tok_list = [], [], [], [], []
        widest = 1
        for it in items:
            seq = it.seq
            q_list.append(it.num_new_tokens)
            start_list.append(it.start)
            bt = seq.block_table
            if seq.table_list is bt and len(bt) == seq.table_len:  # (sync's no-op case, inlined)
                row_list.append(seq.table_row)
            else:
                row_list.append(sync(seq))
            src_list.append(seq.sample_row)
            if it.num_new_tokens == 1:
                tok_list.append(seq.token_ids[it.start])
            if seq.table_len > widest:
                widest = seq.table_len
        q_lens = np.array(q_list, np.int64)
        starts = np.array(start_list, np.int64)
        cu = np.zeros(b + 1, np.int64)
        np.cumsum(q_lens, out=cu[1:])
        n = int(cu[-1])
        num_decodes = len(tok_list) if n == b else int(np.searchsorted(q_lens != 1, True))
        pre = np.flatnonzero(q_lens > 1)
        ntiles = -(-q_lens[pre] // self.block_m)
        c = int(ntiles.sum())
        if layout is None:
            layout = Layout(n, b, c)
        s_pad = layout.seqs
        # block-table columns rounded up to 16: Triton specialises on the row stride's divisibility, so one
        # compiled variant serves every step
        width = min(-(-widest // 16) * 16, self.max_width)
        r = len(sample_rows)
        tables_at, total, flat_np, h = self._stage(layout, r, width)

        if n == b:  # decode-only
            ids = np.array(tok_list, np.int64)
            pos = starts
            seq_of_token = np.arange(b)
        else:
            ids = np.fromiter(
                itertools.chain.from_iterable(
                    it.seq.token_ids[it.start : it.start + it.num_new_tokens] for it in items
                ),
                np.int64,
                n,
            )
            pos = np.arange(n) - np.repeat(cu[:-1] - starts, q_lens)
            seq_of_token = np.repeat(np.arange(b), q_lens)
        tables = flat_np[tables_at:total].reshape(s_pad, width)
        # (np.take would first copy the whole strided table: every live row, 2,560 columns at 40k context)
        tables[:b] = self.rows.table[np.array(row_list, np.int64), :width]
        tables[b:] = 0
        h["ids"][:n] = ids
        h["ids"][n:] = 0
        h["pos"][:n] = pos
        h["pos"][n:] = 0
        h["slots"][:n] = tables[seq_of_token, pos // bs] * bs + pos % bs
        h["slots"][n:] = -1
        placeholder = ids < 0
        has_placeholders = bool(placeholder.any())
        if has_placeholders:
            src = np.array(src_list, np.int64)[seq_of_token]
            if (src[placeholder] < 0).any():
                raise RuntimeError("a placeholder token of a sequence that no launch sampled")
            np.multiply(src, placeholder, out=h["src"][:n])
        else:
            h["src"][:n] = 0
        h["src"][n:] = 0
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
        flat_np[layout.fixed_size : layout.fixed_size + r] = cu[1:][sample_rows] - 1
        views, last, dev_tables = self._ship(layout, r, width, total)
        return StepBatch(
            layout=layout,
            views=views,
            last=last,
            tables=dev_tables,
            num_tokens=n,
            num_seqs=b,
            num_decodes=num_decodes,
            num_prefill_tiles=c,
            width=width,
            has_placeholders=has_placeholders,
            use_lora=use_lora,
        )
