"""What the step masks' worker thread runs, and the device side of its masks (structured/step_masks.py).

``run_job`` runs on the worker: each constraint class's ``work`` (accept the previous step's tokens, fill the
masks), then on CUDA copies the masks to the device on a side stream (``DeviceMasks.plan``: two device pairs
that alternate per job). With ``device_wait`` it also applies the classes' checks (failed rows set to all
ones, extra stop tokens added) before that copy and then writes the job's number into a device flag on the
same stream; the main thread does not wait for the worker at all: it queues ``kernels.token_bitmask.wait_flag``
before the sampling, so the device, not the host, waits for the masks (the step's host loop never blocks on
the fill; the fill -> sampling -> next fill chain runs without a host hand-off).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger("llmray.engine")
_landed, _done = [0.0], [0.0]  # when the worker's latest job got its tokens / was done (perf_counter)


def tokens_of(step: Any) -> Callable[[], Any]:
    """The sampled tokens of a launched step (int64 array), read on the worker: it waits for the step's
    device->host copy (CUDA: its event; the GIL is released while it waits)."""
    ready, out = step.ready, step.host if step.host is not None else step.out

    def read() -> Any:
        if ready is not None:
            ready.synchronize()
        _landed[0] = time.perf_counter()
        return out.token_ids.numpy()

    return read


class DeviceMasks:
    """The device pairs (masks (n, W), rows (n,) int32) the worker copies into, its stream, and the flag."""

    def __init__(self, device: torch.device, words: int) -> None:
        self.device, self.words = device, words
        self.stream: Any = None
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.turn = 0
        self.started: Any = (
            None  # recorded at the latest plan(): after the previous job's sampling was queued
        )
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)  # the latest job whose masks are there
        self.late = torch.zeros(
            1, dtype=torch.int32, device=device
        )  # device waits that gave up (never, I hope)
        self.ids = torch.zeros(64, dtype=torch.int32, pin_memory=True)  # job numbers to copy (a ring)
        self.next_id = 0

    def plan(self, host: torch.Tensor, index: torch.Tensor, max_rows: int, flag: bool) -> tuple:
        """(stream, event to wait for, device masks, device rows, host masks, host rows, (flag, job number
        source, job number) or None). Job J+2 writes J's pair once the event recorded at J+1's plan (after J's
        sampling was queued) has passed."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        n = host.shape[0]
        if not self.pairs or self.pairs[0][0].shape[0] < n:
            size = max(n, max_rows)
            self.pairs = [
                (
                    torch.empty((size, self.words), dtype=torch.int32, device=self.device),
                    torch.empty(size, dtype=torch.int32, device=self.device),
                )
                for _ in range(2)
            ]
            torch.cuda.current_stream(self.device).synchronize()  # (new pairs: nothing reads them yet)
            self.started = None
        self.turn ^= 1
        dm, di = self.pairs[self.turn]
        after, self.started = self.started, torch.cuda.Event()
        self.started.record()
        mark = None
        if flag:
            self.next_id += 1
            slot = self.next_id % self.ids.shape[0]
            self.ids[slot] = self.next_id  # (copied by the worker; reused 64 jobs later)
            mark = (self.flag, self.ids[slot : slot + 1], self.next_id)
        return (self.stream, after, dm[:n], di[:n], host, index, mark)

    def wait(self, job_id: int) -> None:
        """On the current stream: the kernels queued next run once job ``job_id``'s masks are on the device."""
        from llmray.kernels.token_bitmask import wait_flag

        wait_flag(self.flag, job_id, self.late)


def run_job(
    works: list,
    host: torch.Tensor,
    tokens: Callable[[], Any] | None,
    copy: tuple | None,
    checks: list | None = None,
) -> tuple[list, float, Any, dict[int, str]]:
    """On the worker: each constraint class's ``work(host, tokens)`` (its result, or the exception it raised);
    ``checks`` (device_wait: ``(check, packed rows)`` per class): run here, failed rows set to all ones; then
    (``copy``, CUDA) the masks' copy to the device on the side stream. Returns the results, the busy time, the
    event after the copy (None: not copied; the main thread copies them) and the failed packed rows (-> why)."""
    t0 = _landed[0] = time.perf_counter()
    out: list = []
    for work in works:
        try:
            out.append(work(host, tokens))
        except Exception as e:  # reported per row (finish / settle)
            out.append(e)
    failed: dict[int, str] = {}
    if checks is not None:
        with torch.inference_mode():  # (the host masks are inference tensors: the stop bits are set in place)
            for (check, rows), res in zip(checks, out, strict=True):
                try:
                    if isinstance(res, BaseException):
                        raise res
                    failed.update(check(host, res))
                except Exception as e:  # the batch call broke: each of its rows fails alone
                    failed.update({k: f"its token constraint failed: {e!r}" for k, _ in rows})
        if failed:
            host_np = host.numpy()
            for k in failed:
                host_np[k] = -1  # (left unmasked: its request fails alone)
    _done[0] = time.perf_counter()
    busy = _done[0] - max(t0, _landed[0])  # (from the tokens' landing on)
    copied = None
    if copy is not None:
        stream, after, dev_masks, dev_rows, host_masks, host_rows, mark = copy
        try:
            with (
                torch.inference_mode(),
                torch.cuda.stream(stream),
            ):  # (the device pairs are inference tensors)
                try:
                    if after is not None:
                        stream.wait_event(after)
                    dev_masks.copy_(host_masks, non_blocking=True)
                    dev_rows.copy_(host_rows, non_blocking=True)
                finally:
                    if mark is not None:  # always: the device waits for this flag
                        mark[0].copy_(mark[1], non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(stream)
        except Exception as e:  # the main thread copies them instead (not with device_wait: all rows fail)
            logger.warning("mask copy on the side stream failed: %r", e)
            copied = None
            if mark is not None:
                failed.update({k: f"its mask could not be copied: {e!r}" for k in range(host.shape[0])})
    return out, busy, copied, failed
