"""CUDA graphs for decode-only AND mixed prefill+decode steps, captured at start-up, replayed per step.

A graph is captured per (kind, bucket, with LoRA):
- "decode": ``bucket`` one-token sequences (T = S = bucket); buckets 1, 2, 4, 8, 16, 32, 48, 64, 96, ...
- "mixed": ``bucket`` tokens of any mix of decodes and prefill chunks (S = min(bucket, max_num_seqs)
  sequence slots, a padded prefill tile list); buckets 16, 32, 64, ... up to ``max_graph_tokens``.
- "prefill": ONE sequence's chunk without decode rows (a new request's first step, e.g. a short chunk after a
  cached prefix): no decode-kernel launch, and a tile list sized for one sequence (the mixed layout pads it
  for many short ones: thousands of empty programs per layer), buckets up to ``prefill_graph_tokens``.
Its inputs are views of the runner's persistent device input buffer at the bucket's layout (see
step_inputs.py), plus one static block-table buffer: replaying a step costs one copy of the block tables
and ``graph.replay()``; a one-sequence layout's graphs read the table row in place in the input buffer (no
copy). Larger steps run eagerly (their device time dwarfs the launch cost).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from llmray.engine.step_inputs import FIXED, Layout, tables_offset, tile_capacity


def decode_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 32, 48, 64] + list(range(96, max_num_seqs + 32, 32))
    return sorted({min(s, max_num_seqs) for s in sizes})


def mixed_buckets(max_graph_tokens: int, max_num_batched_tokens: int) -> list[int]:
    """Token buckets of the mixed graphs: powers of two from 16 up to the smaller limit."""
    top = min(max_graph_tokens, max_num_batched_tokens)
    return [1 << e for e in range(4, 31) if 1 << e <= top]


class CudaGraphs:
    """Holds the captured graphs; ``forward(views, tables, layout, kind, with_lora)`` is the runner's."""

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        dev_flat: torch.Tensor,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        max_graph_tokens: int,
        max_num_batched_tokens: int,
        block_m: int,
        lora_variants: bool,
        prefill_graph_tokens: int = 0,
    ) -> None:
        self.forward = forward
        self.dev = dev_flat
        self.max_num_seqs = max_num_seqs
        self.block_m = block_m
        self.decode = decode_buckets(max_num_seqs)
        self.mixed = mixed_buckets(max_graph_tokens, max_num_batched_tokens)
        self.prefill = [b for b in self.mixed if b <= prefill_graph_tokens]
        self.variants = (False, True) if lora_variants else (False,)
        self._layouts: dict[tuple[str, int], Layout] = {}  # (kind, bucket) -> its layout (pick, per step)
        self._dst: dict[tuple[int, int], torch.Tensor] = {}  # (rows, width) -> view of the static tables
        smax = max([self.decode[-1]] + [self.layout("mixed", b).seqs for b in self.mixed])
        self.tables = torch.zeros(smax, max_blocks_per_seq, dtype=torch.int64, device=dev_flat.device)
        self.graphs: dict[tuple[str, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None  # the graphs' shared memory pool (the largest graph's, captured first)

    def layout(self, kind: str, bucket: int) -> Layout:
        got = self._layouts.get((kind, bucket))
        if got is None:
            if kind == "decode":
                got = Layout(bucket, bucket, 0)
            else:
                seqs = min(bucket, self.max_num_seqs) if kind == "mixed" else 1
                got = Layout(bucket, seqs, tile_capacity(bucket, seqs, self.block_m))
            self._layouts[(kind, bucket)] = got
        return got

    def pick(
        self, num_tokens: int, num_seqs: int, all_decode: bool, no_decode: bool = False
    ) -> tuple[str, int] | None:
        """The graph (kind, bucket) a step of this size replays, or None (run it eagerly)."""
        if all_decode and num_seqs <= self.decode[-1]:
            return "decode", next(b for b in self.decode if b >= num_seqs)
        if no_decode:
            for b in self.prefill:
                if b >= num_tokens and self.layout("prefill", b).seqs >= num_seqs:
                    return "prefill", b
        for b in self.mixed:
            if b >= num_tokens and self.layout("mixed", b).seqs >= num_seqs:
                return "mixed", b
        return None

    def _tables(self, layout: Layout) -> torch.Tensor:
        """The block tables a graph of ``layout`` reads: the static buffer's first rows, or for one sequence
        its row in place in the input buffer (where ``StepInputs`` stages it)."""
        if layout.seqs != 1:
            return self.tables[: layout.seqs]
        at, width = tables_offset(layout, 1), self.tables.shape[1]
        return self.dev[at : at + width].view(1, width)

    def _blank(self, layout: Layout) -> dict[str, torch.Tensor]:
        """Inputs of a step with no tokens in any slot: both attention kernels skip everything."""
        views = layout.views(self.dev)
        for name in FIXED:
            views[name].zero_()
        views["slots"].fill_(-1)
        views["lora"].fill_(-1)
        views["tile_seq"].fill_(-1)
        return views

    @torch.inference_mode()
    def capture(self, only: Callable[[str, int], bool] | None = None) -> None:
        """Capture every graph (``only``: those (kind, bucket) it accepts, replacing them: benches re-capture
        after changing a runner setting baked into the graphs)."""
        pool = self.pool
        keys = [("decode", b) for b in self.decode] + [("mixed", b) for b in self.mixed]
        keys += [("prefill", b) for b in self.prefill]
        keys = [k for k in keys if only is None or only(*k)]
        keys.sort(key=lambda k: -self.layout(*k).tokens)  # largest first: later graphs reuse its pool
        for (kind, bucket), with_lora in itertools.product(keys, self.variants):
            layout = self.layout(kind, bucket)
            views = self._blank(layout)
            tables = self._tables(layout)
            subst = kind != "prefill"  # placeholder substitution (a prefill chunk holds none: runner.pick)
            self.forward(views, tables, layout, kind, with_lora, placeholders=subst)  # warm-up: compiles
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.forward(views, tables, layout, kind, with_lora, placeholders=subst)
            pool = self.pool = graph.pool() if pool is None else pool
            self.graphs[(kind, bucket, with_lora)] = (graph, hidden)
        torch.cuda.synchronize()

    def replay(self, kind: str, bucket: int, with_lora: bool, tables: torch.Tensor) -> torch.Tensor:
        """Run the graph on the inputs already in the device buffer; ``tables`` (S, width) block tables."""
        # columns past ``width`` keep stale ids: the kernels never read past a sequence's context
        rows, width = tables.shape
        if rows != 1:  # (one sequence: its graphs read the row in place)
            dst = self._dst.get((rows, width))
            if dst is None:
                if len(self._dst) > 256:
                    self._dst.clear()
                dst = self._dst[(rows, width)] = self.tables[:rows, :width]
            dst.copy_(tables)
        if not self.graphs:  # not captured (CPU tests): the same padded step, run eagerly
            layout = self.layout(kind, bucket)
            views, subst = layout.views(self.dev), kind != "prefill"
            return self.forward(views, self._tables(layout), layout, kind, with_lora, placeholders=subst)
        graph, hidden = self.graphs[(kind, bucket, with_lora)]
        graph.replay()
        return hidden
