"""A step's constraint masks, filled on the host while the device runs the step's forward (issue 19).

With async scheduling a step with constrained rows is launched deferred: its forward is queued at once, its
sampling later, because each constrained row's mask needs the row's previous token accepted. The runner
calls ``StepMasks`` at three points (vLLM does the same with its scheduler-side bitmask):

- ``start(next_pending, prev_pending, tokens)`` right after step N is read back (``ModelRunner.collect``):
  step N's tokens go to a worker thread, which accepts them into the constraints of the deferred step N+1 and
  fills N+1's masks (the class's ``fill_job``: for llguidance one ``consume_token_par`` and one
  ``LLExecutor`` fill, the GIL released in both; the interpreter's switch interval is lowered meanwhile so
  that the worker gets the GIL back at once between them). The engine's read-back of step N asks
  ``consumed(N)`` which rows' tokens the worker accepts (and which tokens end their documents: such a class
  has ``end_tokens``), and does not accept those again. Constraint classes without ``fill_job`` (xgrammar's,
  the tests') keep the old order: accepted during the read-back, filled by ``finish``.
- ``finish(pending, failed)`` when step N+1's sampling is queued (just before the next forward): waits for
  the worker and fills the rows it did not take. With ``device_wait`` (CUDA, the default) it does not wait:
  the device polls a host flag the worker stores once its masks are final, then copies them (both queued on
  a side stream by ``start``), the sampling waits for that copy (``mask_worker.py``), and the host settles
  the job (its failed rows) when it reads step N+1 back.
- ``fill_now(seqs, failed, deferred)``: the synchronous fill of a step that was not started early.

Masks are packed: int32 (C, ceil(V/32)) for the C constrained rows plus their sampling rows (C,) int32, in two
pinned pairs that alternate (fenced by an event after their copy). A row whose constraint breaks (or rejects
its token on the worker) is reported in ``failed`` (row -> why) and left unmasked: it fails alone.
"""

from __future__ import annotations

import logging
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from llmray.engine.sequence import PLACEHOLDER, Sequence
from llmray.engine.structured.mask_worker import DeviceMasks, run_job, tokens_of

if TYPE_CHECKING:
    from llmray.engine.sampler import Bitmask

logger = logging.getLogger("llmray.engine")
_WORKER: ThreadPoolExecutor | None = None
# the interpreter's switch interval while a fill is in flight: the worker takes the GIL back within this long
# after each call into the grammar library instead of the default 5 ms (the main thread runs Python throughout);
# 5 us over 20 us: 1.019x the half batch on a quiet H200 host, 1.122x on a busy one (seventh session, W2/W2b)
_SWITCH_S = 5e-6


def _worker() -> ThreadPoolExecutor:
    global _WORKER
    if _WORKER is None:
        _WORKER = ThreadPoolExecutor(1, thread_name_prefix="llmray-masks")
    return _WORKER


class _Job:
    """A fill running on the worker: its pending step, the packed rows it covers and their buffers."""

    def __init__(self, pending: Any, rows: list[tuple[int, Any]], host: torch.Tensor, index: torch.Tensor):
        self.pending = pending
        self.rows = rows  # (sampling row, constraint), packed row k = rows[k]
        self.host, self.index = host, index
        self.future: Future | None = None
        self.checks: list[tuple[Any, list]] = []  # per constraint class: (check, its packed rows)
        self.complete = True  # it covers every constrained row that will need a mask
        self.turn = 0  # its host pair
        self.dev: tuple[torch.Tensor, torch.Tensor] | None = None  # the device pair the worker copies into
        self.flag_id = 0  # device_wait: the job number the worker writes into the device flag
        self.failed: dict[int, str] | None = None  # device_wait: its step's failed rows, filled when settled
        self.stops = False  # its check may change rows after the worker's copy (extra stop tokens)
        self.side: tuple | None = None  # host flag: (the event its copy waits for,)
        self.copied: Any = None  # host flag: the event after its poll and copy on the side stream


class _Plan:
    """A step's fill laid out (``StepMasks._new_plan``); reused while the rows stay the same (``key``)."""

    def __init__(self, key: tuple | None) -> None:
        self.key = key  # (ids of the step's sequences, ids of the previous step's), None: not reusable
        self.rows: list[tuple[int, Any]] = []  # (sampling row, constraint), packed row k = rows[k]
        self.index: list[int] = []  # the sampling rows
        self.accepted: list[Any] = []  # constraints that consume the previous step's token on the worker
        self.jobs: list[tuple[tuple, list]] = []  # per constraint class: ((work, check), packed rows)
        self.complete = True
        self.alive: tuple = ()  # the sequences the key names, kept alive so that no other object takes an id
        # the previous step's rows whose token the worker accepts: row -> the tokens that end its document
        self.consumed: dict[int, frozenset[int]] = {}
        self.stops = False  # a row has extra stop tokens (its check adds them to the filled mask)


class StepMasks:
    def __init__(self, device: torch.device, vocab_size: int, max_rows: int) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.words = -(-vocab_size // 32)
        self.max_rows = max_rows
        self._bufs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._fence: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._job: _Job | None = None
        self._plan: _Plan | None = None
        self._consumed: tuple[Any, dict[int, frozenset[int]]] | None = None  # (step, rows): ``consumed``
        # switches, True by default; False gives an older order (A/B runs):
        self.early = True  # False: every fill synchronous at sampling time
        self.from_event = True  # a fill starts when the previous step's tokens land (False: once read back)
        self.reuse = True  # False: every step's fill laid out anew
        # CUDA: the masks are copied to the device on a side stream, the sampling waits for that copy on the
        # device (False: the main thread copies them after waiting for the worker)
        self.side_copy = True
        self.device_wait = True  # (side_copy) the device waits for the masks by a flag, not the host
        # device_wait: the worker stores a host flag, the device polls it (the worker makes no CUDA call);
        # False: the worker copies the masks and sets a device flag
        self.host_flag = True
        self.sleep_collect = True  # device_wait: the read-back sleeps until the worker is done (``settle``)
        # host flag: stored as soon as the fill returns if no check changes the masks (no extra stop tokens)
        self.early_signal = True  # (False: after the checks)
        self.copy_at_start = True  # host flag: its poll and the copy queued by ``start`` (False: ``finish``)
        self._devm: DeviceMasks | None = None
        self._unsettled: _Job | None = None  # device_wait: a job sampled but not yet waited for on the host
        self.started, self.work_s = 0, 0.0  # fills started early, the worker's busy seconds (tests, benches)
        self._switch = sys.getswitchinterval()

    # --- buffers ----------------------------------------------------------------------------------
    def _buffer(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host masks (rows, W) int32 and their sampling rows (rows,) int32: two pinned pairs alternate; a
        pair is reused once its last copy to the device has completed."""
        if not self._bufs or self._bufs[0][0].shape[0] < rows:
            n = max(rows, self.max_rows)
            self._bufs = [
                (
                    torch.empty((n, self.words), dtype=torch.int32, pin_memory=self.is_cuda),
                    torch.empty(n, dtype=torch.int32, pin_memory=self.is_cuda),
                )
                for _ in range(2)
            ]
            self._fence = [None, None]
        self._turn ^= 1
        fence = self._fence[self._turn]
        if fence is not None:
            fence.synchronize()
        host, index = self._bufs[self._turn]
        return host[:rows], index[:rows]

    def _to_device(self, host: torch.Tensor, index: torch.Tensor) -> Bitmask:
        dev = (host.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True))
        if self.is_cuda:
            fence = torch.cuda.Event()
            fence.record()
            self._fence[self._turn] = fence
        return dev

    # --- the three calls --------------------------------------------------------------------------
    @staticmethod
    def _constrained(seqs: list[Sequence], deferred: bool) -> list[tuple[int, Any]]:
        rows = []
        for r, seq in enumerate(seqs):
            if seq.constraint is None or seq.is_finished:
                continue  # (a finished sequence's sample is discarded: no mask)
            if seq.num_tokens > deferred and seq.token_ids[-1 - deferred] == PLACEHOLDER:
                raise RuntimeError("a constrained sequence was launched before its last token was known")
            rows.append((r, seq.constraint))
        return rows

    def fill_now(
        self, seqs: list[Sequence], failed: dict[int, str], deferred: bool = False
    ) -> Bitmask | None:
        """The packed masks of the step's constrained rows, filled now (None: no row is constrained).
        ``deferred``: the step's own placeholder already ends each sequence; the token before it must be known."""
        self._settle()
        job, self._job = self._job, None
        if job is not None and job.future is not None:  # a stale job (its step was dropped): let it end
            self._unsettled = job
            self._settle()
        rows = self._constrained(seqs, deferred)
        if not rows:
            return None
        host, index = self._buffer(len(rows))
        self._fill(host, index, rows, failed)
        return self._to_device(host, index)

    @staticmethod
    def _fill(
        host: torch.Tensor, index: torch.Tensor, rows: list[tuple[int, Any]], failed: dict[int, str]
    ) -> None:
        from llmray.engine.structured.batch import fill_bitmasks

        index.numpy()[:] = [r for r, _ in rows]
        for k, why in fill_bitmasks(host, [(k, c) for k, (_, c) in enumerate(rows)]).items():
            _report(rows[k][0], why, host, k, failed)

    def start(self, pending: Any, prev: Any, tokens: list[int] | None = None) -> None:
        """Fill the deferred step ``pending``'s masks on the worker thread, after accepting into its constraints
        the tokens of step ``prev`` (the step sampled just before it; None: no step). ``tokens``: ``prev``'s
        tokens, read back already; None: the worker reads them itself as soon as they land (``prev``'s
        device->host copy event), so the fill starts then, not after the host's read-back of ``prev``."""
        if not self.early or self._job is not None or (tokens is None and not self.from_event):
            return
        source = None
        key: tuple | None = None
        if prev is not None and prev.out is not None:
            source = tokens_of(prev) if tokens is None else (lambda: tokens)
            if not prev.failed and self.reuse:  # the same rows as the step before (the norm): its plan again
                key = (tuple(map(id, pending.seqs)), tuple(map(id, prev.seqs)))
        plan = self._plan if key is not None and self._plan is not None and self._plan.key == key else None
        if plan is None:
            plan = self._plan = self._new_plan(pending, prev, key)
        if not plan.rows:
            return
        if self._unsettled is not None and self._unsettled.turn != self._turn:  # (its host pair is next)
            self._settle()
        host, index = self._buffer(len(plan.rows))
        index.numpy()[:] = plan.index
        job = self._job = _Job(pending, plan.rows, host, index)
        job.complete, job.stops, job.turn = plan.complete, plan.stops, self._turn
        job.checks = [(check, rws) for (_, check), rws in plan.jobs]
        copy, checks, signal = None, None, None
        if self.side_copy and self.is_cuda:
            if self._devm is None:
                self._devm = DeviceMasks(self.device, self.words)
            flag = self.device_wait and plan.complete
            by_host = flag and self.host_flag and self._devm.host_ok
            copy = self._devm.plan(host, index, self.max_rows, flag and not by_host)
            job.dev = (copy[2], copy[3])
            if by_host:  # the worker stores the host flag; the device polls it, then copies the masks
                after = copy[1]
                job.side, job.flag_id, copy = (after,), self._devm.next_flag(), None
                signal = (self._devm.host_np, job.flag_id)
                if self.copy_at_start:  # (queued now: the copy need not wait for the host to reach finish)
                    job.copied = self._devm.copy_when_flagged(job.flag_id, host, index, job.dev, after)
                    self._fence[job.turn] = job.copied
            elif flag:
                job.flag_id = copy[6][2]
            checks = job.checks if flag else None  # (run by the worker, before its masks leave)
        # the worker needs the GIL only briefly (between its calls into the library): let it have it soon
        if sys.getswitchinterval() > _SWITCH_S:
            self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, _SWITCH_S))
        works = [work for (work, _), _ in plan.jobs]
        final = self.early_signal and not plan.stops
        job.future = _worker().submit(run_job, works, host, source, copy, checks, signal, final)
        self.started += 1
        # the read-back of ``prev`` must not accept these rows' tokens again (``consumed``)
        self._consumed = (prev, plan.consumed) if plan.consumed else None

    def settle(self, step: Any) -> None:
        """Before the host waits for ``step``'s tokens (device_wait): wait, asleep, for the worker's job that
        ``step``'s sampling waits for on the device (its tokens come later anyway), not spinning beside it."""
        if self.sleep_collect and self._unsettled is not None and self._unsettled.pending is step:
            self._settle()

    def consumed(self, step: Any) -> dict[int, frozenset[int]] | None:
        """For the read-back of ``step``: its rows whose sampled token the worker accepts into their constraint
        (row -> the tokens that end that row's document: it finishes "stop" on one of them); the read-back must
        not accept those tokens again. None: no such row (each constrained row is accepted as usual)."""
        if self._unsettled is not None and self._unsettled.pending is step:
            self._settle()  # (device_wait: its failed rows, before the read-back reads them)
        rec = self._consumed
        if rec is None or rec[0] is not step:
            return None
        self._consumed = None
        return rec[1]

    @staticmethod
    def _new_plan(pending: Any, prev: Any, key: tuple | None) -> _Plan:
        """Which rows of ``pending`` the worker fills, which of them first consume ``prev``'s token (``consumed``:
        by their row in ``prev``), and each constraint class's ``fill_job`` over them."""
        sampled: dict[int, int] = {}
        if prev is not None and prev.out is not None:
            failed = prev.failed
            sampled = {id(s): r for r, s in enumerate(prev.seqs) if r not in failed}
        plan = _Plan(key)
        plan.alive = (pending.seqs, prev.seqs if prev is not None else None)  # (their ids stay theirs)
        rows = plan.rows
        groups: dict[Any, tuple[list, list]] = {}  # constraint class -> (accepts, packed rows)
        for r, seq in enumerate(pending.seqs):
            c = seq.constraint
            if c is None or seq.is_finished:
                continue
            cls = type(c)
            group = groups.get(cls)
            if group is None:
                if not hasattr(cls, "fill_job"):
                    plan.complete = False
                    continue
                group = groups[cls] = ([], [])
            i = sampled.get(id(seq))
            if i is None:  # it did not sample in ``prev``: its previous token is known (or it waits)
                if seq.num_tokens > 1 and seq.token_ids[-2] == PLACEHOLDER:
                    plan.complete = False
                    continue
            else:
                group[0].append((c, i))
                plan.accepted.append(c)
                plan.consumed[i] = c.end_tokens  # the worker consumes that token, not the read-back
            group[1].append((len(rows), c))
            rows.append((r, c))
        plan.index = [r for r, _ in rows]
        plan.stops = any(getattr(c, "extra_stops", None) for _, c in rows)
        plan.jobs = [(cls.fill_job(acc, rws), rws) for cls, (acc, rws) in groups.items() if rws]
        if not plan.complete:
            plan.key = None  # (rows that wait: not reused)
        return plan

    def ready(self, pending: Any) -> bool:
        """Whether ``finish(pending)`` would not wait: the worker is done with its masks (a step whose fill
        was not started early is not ready: it fills when it must)."""
        job = self._job
        if job is None or job.pending is not pending or job.future is None:
            return False
        return bool(job.flag_id) or job.future.done()  # (device_wait: the device waits, not the host)

    def finish(self, pending: Any, failed: dict[int, str]) -> Bitmask | None:
        """The packed masks of the deferred step ``pending``, on the device: the worker's rows (waited for)
        plus any constrained row it did not take, filled now."""
        job, self._job = self._job, None
        if job is None or job.pending is not pending:
            self._job = job  # (fill_now waits for a stale job)
            return self.fill_now(pending.seqs, failed, deferred=True)
        assert job.future is not None
        if job.flag_id:  # device_wait: the sampling waits on the device for the worker's flag
            assert self._devm is not None and job.dev is not None, "a flagged job has its device pair"
            self._settle()
            job.failed, self._unsettled = failed, job
            if job.side is not None:  # the host flag's poll, then the masks' copy, on the side stream
                if job.copied is None:  # (not queued by ``start``)
                    job.copied = self._devm.copy_when_flagged(
                        job.flag_id, job.host, job.index, job.dev, job.side[0]
                    )
                    self._fence[job.turn] = job.copied  # (its host pair: free after that copy)
                torch.cuda.current_stream(self.device).wait_event(job.copied)
            else:
                self._devm.wait(job.flag_id)
            return job.dev
        results, work_s, copied, _ = job.future.result()
        self._restore_switch()
        self.work_s += work_s
        dirty = job.stops
        for (check, rws), res in zip(job.checks, results, strict=True):
            if isinstance(res, BaseException):  # the batch call broke: each of its rows fails alone
                reasons = {k: f"its token constraint failed: {res!r}" for k, _ in rws}
            else:
                reasons = check(job.host, res)
            for k, why in reasons.items():
                _report(job.rows[k][0], why, job.host, k, failed)
                dirty = True
        late = []
        if not job.complete:
            taken = {r for r, _ in job.rows}
            late = [(r, c) for r, c in self._constrained(pending.seqs, True) if r not in taken]
        if copied is not None:  # the worker's copy: the sampling waits for it on the device
            assert job.dev is not None, "a job copied by the worker has its device pair"
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(copied)
            if dirty and not late:  # rows changed after the worker's copy: copied again, behind it
                job.dev[0].copy_(job.host, non_blocking=True)
            fence = torch.cuda.Event()
            fence.record(stream)
            self._fence[job.turn] = fence  # (the host pair: free after both copies)
            if not late:
                return job.dev
        if not late:
            return self._to_device(job.host, job.index)
        # rows the worker did not take (constraints accepted in the read-back): one more packed buffer
        n = len(job.rows)
        host, index = self._buffer(n + len(late))
        host[:n].copy_(job.host)
        index[:n].copy_(job.index)
        index.numpy()[n:] = [r for r, _ in late]
        from llmray.engine.structured.batch import fill_bitmasks

        for k, why in fill_bitmasks(host, [(n + k, c) for k, (_, c) in enumerate(late)]).items():
            _report(late[k - n][0], why, host, k, failed)
        return self._to_device(host, index)

    def _settle(self) -> None:
        """device_wait: wait for the unsettled job's worker (done by the time its tokens are read back) and
        report its failed rows into its step's ``failed``."""
        job, self._unsettled = self._unsettled, None
        if job is None or job.future is None:
            return
        _, work_s, copied, reasons = job.future.result()
        self._restore_switch()
        self.work_s += work_s
        if copied is not None:
            self._fence[job.turn] = copied  # (its host pair: free after the worker's copy)
        for k, why in reasons.items():
            logger.warning("constraint of sampling row %d failed: %s", job.rows[k][0], why)
            if job.failed is not None:
                job.failed[job.rows[k][0]] = why

    def _restore_switch(self) -> None:
        if self._job is None and self._unsettled is None:  # (no fill in flight any more)
            sys.setswitchinterval(self._switch)


def _report(row: int, why: str, host: torch.Tensor, k: int, failed: dict[int, str]) -> None:
    logger.warning("constraint of sampling row %d failed: %s", row, why)
    failed[row] = why
    host[k] = -1
