"""A micro-batch's forward + backward replayed from a CUDA graph: the training step without launch overhead.

Why: an eager training step launches thousands of kernels, each through Python (autograd, the Triton
launchers, LoRA layers); on an H200 most of them run in microseconds, so the GPU waits on the CPU
(bench/results/kernels.json: a Triton RMSNorm forward+backward takes 0.08 ms on the GPU and 0.54 ms of
wall time). ``StepGraphs`` captures forward and backward once per input shape and replays them with
one launch; the optimizer step, gradient clipping and any gradient all-reduce stay eager (few launches).

Protocol (what the caller keeps), by ``accumulate``:
- ``accumulate=False`` (the default): gradients are set to None after each optimizer step
  (``zero_grad(set_to_none=True)``, as eagerly); a graph is captured with no gradients present, so its
  backward writes each parameter's gradient into a buffer of its own (no zeroing, no accumulation pass)
  and every replay binds those buffers to ``.grad`` again. Such a graph serves one-micro-batch steps;
  with several micro-batches per step (gradient accumulation) the step runs eagerly.
- ``accumulate=True``: gradients are never set to None: the captured backward adds into the parameters'
  existing ``.grad`` tensors (fixed addresses), which the caller zeroes in place
  (``zero_grad(set_to_none=False)``) before a step; serves gradient accumulation too.
Both: a shape runs eagerly ``warmup`` times (on the capture stream: lazy initialisation such as Triton
compiles and cuBLAS workspaces happens there, outside a capture), then is captured and replayed; at most
``max_graphs`` shapes get a graph (one shared memory pool), others always run eagerly. The forward must
be a pure function of its inputs and the parameters (no host syncs, no Python state that changes between
steps; dropout is fine, its RNG offsets are captured).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmray.train.harness import autocast


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # static inputs the replay reads
    targets: torch.Tensor
    loss: torch.Tensor  # static output the replay writes
    grads: list[torch.Tensor | None]  # accumulate=False: the parameters' gradients the replay writes


class StepGraphs:
    """``fwd_bwd(ids, targets, n_micro)``: loss / n_micro's gradients added to ``.grad``, from a CUDA graph."""

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        params: Sequence[torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        warmup: int = 2,
        max_graphs: int = 4,
        accumulate: bool = False,
    ) -> None:
        if torch.device(device).type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.forward, self.params = forward, list(params)
        self.device, self.dtype = torch.device(device), dtype
        self.warmup, self.max_graphs, self.accumulate = warmup, max_graphs, accumulate
        self.graphs: dict[tuple, _Captured] = {}
        self.seen: Counter[tuple] = Counter()
        self.replays = 0
        self.failed: str | None = None  # why a capture failed (then every step runs eagerly)
        self._stream = torch.cuda.Stream(device=self.device)
        self._pool: Any = None  # the graphs' shared memory pool (an opaque handle from torch)

    def _eager(self, ids: torch.Tensor, targets: torch.Tensor, n_micro: int) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            loss = self.forward(ids, targets=targets) / n_micro
        loss.backward()
        return loss.detach()

    def fwd_bwd(self, ids: torch.Tensor, targets: torch.Tensor, n_micro: int = 1) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns its loss / n_micro (a new tensor, no host sync)."""
        key = (tuple(ids.shape), tuple(targets.shape), ids.dtype, targets.dtype, n_micro)
        cap = self.graphs.get(key)
        if cap is None:
            self.seen[key] += 1
            grads = [p.grad is not None for p in self.params]
            ready = all(grads) if self.accumulate else (n_micro == 1 and not any(grads))
            full = len(self.graphs) >= self.max_graphs
            if self.failed or not ready or self.seen[key] <= self.warmup or full:
                return self._on_stream(lambda: self._eager(ids, targets, n_micro))
            try:
                cap = self._capture(key, ids, targets, n_micro)
            except Exception as e:  # a capture that fails leaves training to eager steps, not to a crash
                self.failed = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"CUDA graph capture failed, training goes on eagerly: {self.failed}", stacklevel=2
                )
                if not self.accumulate:
                    for p in self.params:
                        p.grad = None
                torch.cuda.synchronize(self.device)
                return self._on_stream(lambda: self._eager(ids, targets, n_micro))
        elif not self.accumulate and any(p.grad is not None for p in self.params):
            raise RuntimeError("StepGraphs(accumulate=False) needs the gradients set to None before a step")
        cap.ids.copy_(ids)
        cap.targets.copy_(targets)
        cap.graph.replay()
        if not self.accumulate:
            for p, g in zip(self.params, cap.grads, strict=True):
                p.grad = g
        self.replays += 1
        return cap.loss.clone()

    def _on_stream(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``fn`` on the capture stream, ordered after and before the current stream's work."""
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            out = fn()
        main.wait_stream(self._stream)
        return out

    def _capture(self, key: tuple, ids: torch.Tensor, targets: torch.Tensor, n_micro: int) -> _Captured:
        static_ids, static_targets = ids.clone(), targets.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            with autocast(self.device, self.dtype):
                loss = self.forward(static_ids, targets=static_targets) / n_micro
            loss.backward()
            static_loss = loss.detach()
        if self._pool is None:
            self._pool = graph.pool()
        grads: list[torch.Tensor | None] = []
        if not self.accumulate:
            grads = [p.grad for p in self.params]  # written by every replay
            for p in self.params:
                p.grad = None
        cap = _Captured(graph, static_ids, static_targets, static_loss, grads)
        self.graphs[key] = cap
        return cap
