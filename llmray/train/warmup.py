"""Where a run's first seconds go: Triton compiles apart from the steps (``warmup.json`` next to the metrics).

A cold start of the Triton path compiles every kernel specialisation the step, the optimizer and the
evaluation launch, on first use, one after the other; on a small model that is most of a short run.
``WarmupClock`` measures it: while started, every ``triton.JITFunction.run`` call that compiled (its
kernel cache grew) is timed (compile, launcher and first launch; a few microseconds on calls that do not
compile), per kernel; ``step_done`` times the first steps (with a device sync) and ``summary`` gives the
numbers ``train_steps`` writes as ``warmup.json``. Nothing is patched unless started; ``stop`` restores.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch


def _compiled(fn: Any) -> int:
    """How many kernels a JITFunction holds (its per-device caches); -1 where this triton has no such field."""
    caches = getattr(fn, "device_caches", None)
    if caches is None:
        return -1
    return sum(len(c[0]) for c in caches.values())


class WarmupClock:
    """Triton compile seconds (total, per kernel) and the first steps' wall times of one worker."""

    def __init__(self, device: torch.device, first_steps: int = 4) -> None:
        self.device = device
        self.first_steps = first_steps
        self.compile_s = 0.0
        self.compiles = 0
        self.by_kernel: dict[str, list[float]] = {}  # name -> [compiles, seconds]
        self.step_s: list[float] = []  # wall time of each of the first steps (synced)
        self.marks: dict[str, Any] = {}  # named phases' seconds (e.g. the first evaluation)
        self._restore: tuple[Any, Any] | None = None
        self._last = time.perf_counter()

    def start(self) -> WarmupClock:
        """Time Triton compiles from now on (CUDA only; no-op without triton)."""
        self._last = time.perf_counter()
        if self._restore is not None or self.device.type != "cuda":
            return self
        try:
            from triton.runtime.jit import JITFunction
        except ImportError:
            return self
        orig = JITFunction.run
        clock = self

        def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
            before = _compiled(fn)
            t = time.perf_counter()
            out = orig(fn, *args, **kwargs)
            dt = time.perf_counter() - t
            if (before >= 0 and _compiled(fn) != before) or (before < 0 and dt > 0.02):
                clock._add(getattr(fn, "_fn_name", None) or getattr(fn, "__name__", None) or str(fn), dt)
            return out

        JITFunction.run = run
        self._restore = (JITFunction, orig)
        return self

    def _add(self, name: str, seconds: float) -> None:
        self.compile_s += seconds
        self.compiles += 1
        entry = self.by_kernel.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds

    def stop(self) -> None:
        """Restore triton's JITFunction.run."""
        if self._restore is not None:
            cls, orig = self._restore
            cls.run = orig
            self._restore = None

    @property
    def active(self) -> bool:
        return self._restore is not None

    def step_done(self) -> None:
        """After each step: the first ``first_steps`` steps' wall times (a device sync each)."""
        if len(self.step_s) >= self.first_steps:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.step_s.append(round(now - self._last, 3))
        self._last = now

    def mark(self, name: str, seconds: float) -> None:
        self.marks[name] = round(seconds, 3)  # (``marks`` also takes other JSON values)

    def first_eval_done(
        self, record: dict[str, Any], t_eval: float, t_start: float, path: Path | None
    ) -> None:
        """After an evaluation: if still started, add the counts to ``record``, stop, write ``path`` (JSON)."""
        if not self.active:
            return
        now = time.perf_counter()
        self.mark("first_eval_s", now - t_eval)
        self.mark("to_first_eval_s", now - t_start)
        record.update(self.record_fields())
        self.stop()
        if path is not None:
            path.write_text(json.dumps(self.summary(), indent=1))

    def record_fields(self) -> dict[str, Any]:
        """Fields for a metrics record while started: compiles so far and their seconds."""
        return {"triton_compiles": self.compiles, "triton_compile_s": round(self.compile_s, 2)}

    def summary(self) -> dict[str, Any]:
        top = sorted(self.by_kernel.items(), key=lambda kv: -kv[1][1])
        return {
            "first_steps_s": self.step_s,
            **self.marks,
            "triton_compiles": self.compiles,
            "triton_compile_s": round(self.compile_s, 2),
            "by_kernel": {k: [int(n), round(s, 3)] for k, (n, s) in top},
        }


def _cuda_triton() -> bool:
    """Whether Triton compiles for a GPU here (not the CPU interpreter)."""
    import os

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        import triton.runtime.jit  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def compile_ahead(threads: int = 16) -> Iterator[dict[str, Any]]:
    """Inside the block every Triton kernel launch becomes a compile on a thread pool (nothing runs on the
    GPU, so whatever the block computes is garbage); leaving it waits for the compiles. Run a step's
    forward and backward in it once and the real step finds its kernels compiled: the compiles (front end,
    LLVM, ptxas) of different kernels overlap instead of running one after the other.

    Calls of one kernel function compile one at a time (its later calls with the same specialisation hit
    its cache). Yields a dict that gets ``errors`` (compiles that failed: the real launch compiles again and
    raises there) and ``wall_s``. A no-op without a CUDA triton.
    """
    info: dict[str, Any] = {"errors": [], "submitted": 0}
    if not _cuda_triton():
        yield info
        return
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    t0 = time.perf_counter()
    driver.active.get_current_device()  # the driver's one-time set-up on this thread, before any pool thread
    device = torch.cuda.current_device()
    orig = JITFunction.run
    locks: dict[int, threading.Lock] = {}
    pool = ThreadPoolExecutor(threads, thread_name_prefix="triton-compile")
    futures = []

    def compile_one(fn: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        torch.cuda.set_device(device)
        with locks[id(fn)]:
            kernel = orig(fn, *args, warmup=True, **kwargs)
            init = getattr(kernel, "_init_handles", None)  # load the binary and build its launcher here too
            if callable(init):
                init()

    def run(fn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if warmup:
            return orig(fn, *args, grid=grid, warmup=True, **kwargs)
        locks.setdefault(id(fn), threading.Lock())
        futures.append(pool.submit(compile_one, fn, args, dict(kwargs, grid=grid)))
        info["submitted"] += 1
        return None

    JITFunction.run = run
    try:
        yield info
    finally:
        JITFunction.run = orig
        for f in futures:
            try:
                f.result(timeout=max(1.0, 300.0 - (time.perf_counter() - t0)))
            except Exception as e:  # the real launch compiles (again) and reports it
                info["errors"].append(f"{type(e).__name__}: {e}"[:300])
        pool.shutdown(wait=False, cancel_futures=True)
        info["wall_s"] = round(time.perf_counter() - t0, 3)


def precompile_training(
    model: torch.nn.Module,
    ids: torch.Tensor,  # (B, T): one micro-batch's inputs
    targets: torch.Tensor,  # (B, T)
    device: torch.device,
    dtype: torch.dtype,
    optimizer: torch.optim.Optimizer | None = None,
    threads: int = 16,
) -> dict[str, Any]:
    """Compile ahead (``compile_ahead``) the Triton kernels of one training forward + backward, of Muon's
    step (its Muon groups: their Triton passes launch nothing in the block; the AdamW groups' steps would count,
    so AdamW's kernel compiles on stand-in tensors) and of one evaluation forward on this batch's shape; every gradient is None
    afterwards, the weights unchanged (Muon's momentum buffers exist, zero, as before a first step).
    One process only: under DDP/FSDP the block would all-reduce and Muon's sharded path update in torch ops."""
    from llmray.train.harness import FOLD_CLIP, autocast

    if torch.device(device).type != "cuda" or not _cuda_triton():  # nothing to compile (the block would run)
        return {"errors": [], "submitted": 0, "wall_s": 0.0}
    was_training = model.training
    with compile_ahead(threads) as info:
        # the eager steps read views of the batch; a CUDA graph's capture reads contiguous copies of them
        for x, y in ((ids, targets), (ids.contiguous(), targets.contiguous())):
            with autocast(device, dtype):
                loss = model(x, targets=y)
            loss.backward()
        if optimizer is not None and getattr(optimizer, "accepts_grad_scale", False):
            groups = optimizer.param_groups
            optimizer.param_groups = [g for g in groups if g.get("use_muon")]
            try:  # with a clipping scale, as train_step calls it (FOLD_CLIP): the same specialisations
                scale = torch.ones((), device=device) if FOLD_CLIP else None
                optimizer.step(grad_scale=scale)  # type: ignore[call-overload]
                # AdamW's kernel on stand-in tensors (its groups' step counts must not move)
                from llmray.train.optim_kernels import adamw_

                t = [torch.zeros(16, device=device) for _ in range(4)]
                adamw_(t[:1], t[1:2], t[2:3], t[3:], 1, 1e-3, (0.9, 0.95), 1e-8, 0.0, scale)
            finally:
                optimizer.param_groups = groups
        model.eval()
        with torch.no_grad(), autocast(device, dtype):
            model(ids)
        model.train(was_training)
    for p in model.parameters():
        p.grad = None
    return info


def precompile_while_fetching(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    fetch: Callable[[], torch.Tensor],
    shape: tuple[int, int],  # (B, T + 1): the batches' shape
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``precompile_training`` on a stand-in (B, T + 1) int64 batch while ``fetch`` gets the first real batch
    on a thread (Ray Data's pipeline starts meanwhile: seconds); returns that batch and what it took."""
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(fetch)
        stand_in = torch.zeros(shape, dtype=torch.long, device=device)
        info = precompile_training(model, stand_in[:, :-1], stand_in[:, 1:], device, dtype, optimizer)
        t_wait = time.perf_counter()
        batch = first.result()
    info.update(errors=info["errors"][:3], n_errors=len(info["errors"]))
    info["then_waited_for_data_s"] = round(time.perf_counter() - t_wait, 3)
    return batch, info
