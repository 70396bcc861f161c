"""What the step masks' worker thread runs, and the device side of its masks (structured/step_masks.py).

``run_job`` runs on the worker: each constraint class's ``work`` (accept the previous step's tokens, fill the
masks), then on CUDA copies the masks to the device on a side stream (``DeviceMasks.plan``: two device pairs
that alternate per job). With ``device_wait`` it also applies the classes' checks (failed rows set to all
ones, extra stop tokens added) before the masks leave, and the main thread does not wait for the worker at
all: it queues ``kernels.token_bitmask.wait_flag`` before the sampling, so the device, not the host, waits
for the masks (the fill -> sampling -> next fill chain runs without a host hand-off). Two flags:

- host flag (``StepMasks.host_flag``, the default): the worker only stores the job's number into a pinned
  host word (``signal``), as soon as its fill returns when no check changes the masks (``final``); the main
  thread has queued, on a side stream when it started the job, the poll of that word and the masks' copy
  (``copy_when_flagged``: it overlaps the forward), and the sampling waits for that copy. The worker makes
  no CUDA call, so after the fill it needs the GIL once, not once per CUDA call (each a wait behind the main
  thread's Python, long when the host's CPUs are contended).
- device flag: the worker copies the masks on its side stream, then the job's number into a device word.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger("llmray.engine")
_landed, _done = [0.0], [0.0]  # when the worker's latest job got its tokens / was done (perf_counter)
HOST_POLLS = 1_000_000  # the host flag's poll limit: each poll a read over the bus (~1 us)


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
        # host flag: the latest job whose masks are filled, stored by the worker, polled by the device (mapped)
        self.host = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self.host_np = self.host.numpy()
        self.host_ok = True  # False: the device cannot read the host flag (the device flag instead)
        try:
            from llmray.kernels.token_bitmask import wait_flag

            wait_flag(self.host, 0, self.late)
        except Exception as e:
            logger.warning("the device cannot poll a host flag, the mask worker copies: %r", e)
            self.host_ok = False

    def plan(self, host: torch.Tensor, index: torch.Tensor, max_rows: int, flag: bool) -> tuple:
        """(stream, event to wait for, device masks, device rows, host masks, host rows, (flag, job number
        source, job number) or None). Job J+2 writes J's pair once the event recorded at J+1's plan (after J's
        sampling was queued) has passed."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        dm, di = self.pair(host.shape[0], max_rows)
        after, self.started = self.started, torch.cuda.Event()
        self.started.record()
        mark = None
        if flag:
            self.next_id += 1
            slot = self.next_id % self.ids.shape[0]
            self.ids[slot] = self.next_id  # (copied by the worker; reused 64 jobs later)
            mark = (self.flag, self.ids[slot : slot + 1], self.next_id)
        return (self.stream, after, dm, di, host, index, mark)

    def pair(self, n: int, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next device pair's first ``n`` rows (masks (n, W), rows (n,) int32)."""
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
        return dm[:n], di[:n]

    def wait(self, job_id: int) -> None:
        """On the current stream: the kernels queued next run once job ``job_id``'s masks are on the device."""
        from llmray.kernels.token_bitmask import wait_flag

        wait_flag(self.flag, job_id, self.late)

    def copy_when_flagged(
        self, job_id: int, host: torch.Tensor, index: torch.Tensor, dev: tuple, after: Any
    ) -> torch.cuda.Event:
        """Host flag, queued on the side stream (the copy overlaps the forward when the fill is done before
        it): after the event ``after`` (the device pair's last sampling), the poll of the host flag until the
        worker stores ``job_id`` (reads over the bus: a bounded poll of ~1 s at most, counted in ``late``), then
        the masks' copy into the device pair ``dev``. Returns the event after the copy."""
        from llmray.kernels.token_bitmask import wait_flag

        with (
            torch.inference_mode(),
            torch.cuda.stream(self.stream),
        ):  # (the device pairs are inference tensors)
            if after is not None:
                self.stream.wait_event(after)
            wait_flag(self.host, job_id, self.late, max_iters=HOST_POLLS)
            dev[0].copy_(host, non_blocking=True)
            dev[1].copy_(index, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return copied

    def next_flag(self) -> int:
        self.next_id += 1
        return self.next_id


def run_job(
    works: list,
    host: torch.Tensor,
    tokens: Callable[[], Any] | None,
    copy: tuple | None,
    checks: list | None = None,
    signal: tuple | None = None,
    final: bool = False,
) -> tuple[list, float, Any, dict[int, str]]:
    """On the worker: each constraint class's ``work(host, tokens)`` (its result, or the exception it raised);
    ``checks`` (device_wait: ``(check, packed rows)`` per class): run here, failed rows set to all ones; then
    (``copy``, CUDA) the masks' copy to the device on the side stream, or (``signal``: (host flag as a numpy
    array, job number)) the job's number stored into the host flag, always, even if the job broke. ``final``:
    the works leave every row final (no check adds stop tokens): unless a work broke, the masks leave (copy,
    signal) before the checks, which then only report failed rows (a failed row's sample is discarded).
    Returns the results, the busy time, the event after the copy (None: not copied here) and the failed
    packed rows."""
    sent = [signal is None]
    try:
        return _run(works, host, tokens, copy, checks, signal if final else None, sent)
    finally:
        if not sent[0]:  # (after every write to the host masks: the device copies them next)
            signal[0][0] = signal[1]  # type: ignore[index]  # (sent is False only with a signal)


def _run(
    works: list,
    host: torch.Tensor,
    tokens: Callable[[], Any] | None,
    copy: tuple | None,
    checks: list | None,
    early: tuple | None,
    sent: list[bool],
) -> tuple[list, float, Any, dict[int, str]]:
    t0 = _landed[0] = time.perf_counter()
    out: list = []
    for work in works:
        try:
            out.append(work(host, tokens))
        except Exception as e:  # reported per row (finish / settle)
            out.append(e)
    final = early is not None and not any(isinstance(r, BaseException) for r in out)
    if final:  # the masks are final: the device may copy them now (host flag)
        early[0][0] = early[1]  # type: ignore[index]  # (final implies early)
        sent[0] = True
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
        if failed and not final:
            host_np = host.numpy()
            for k in failed:
                host_np[k] = -1  # (left unmasked: its request fails alone)
    _done[0] = time.perf_counter()
    busy = _done[0] - max(t0, _landed[0])  # (from the tokens' landing on)
    copied = _copy(copy, host, failed) if copy is not None else None
    return out, busy, copied, failed


def _copy(copy: tuple, host: torch.Tensor, failed: dict[int, str]) -> Any:
    """The worker's copy of the masks to the device on the side stream, then the device flag (always); the
    event after it, or None (then every row is in ``failed``: the device flag went up without the masks)."""
    stream, after, dev_masks, dev_rows, host_masks, host_rows, mark = copy
    try:
        with torch.inference_mode(), torch.cuda.stream(stream):  # (the device pairs are inference tensors)
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
        return copied
    except Exception as e:  # the main thread copies them instead (not with device_wait: all rows fail)
        logger.warning("mask copy on the side stream failed: %r", e)
        if mark is not None:
            failed.update({k: f"its mask could not be copied: {e!r}" for k in range(host.shape[0])})
        return None
