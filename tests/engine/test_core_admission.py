"""The engine core's admission window (``EngineCore.admit_held``): requests that arrive while a batch decodes
are held briefly and enter the batch together; an idle engine or a batch they fill admits them at once; a
backlog waits in the core and refills free slots in groups; a held request can be aborted."""

from __future__ import annotations

import time

from llmray.engine.core import EngineCore


class _Engine:
    """What admit_held uses of an LLMEngine: add_request, abort, has_unfinished, stats, config."""

    class config:  # noqa: N801
        max_num_seqs = 4

    def __init__(self, running: int = 0, waiting: int = 0) -> None:
        self.running, self.waiting, self.added = running, waiting, []

    def add_request(self, rid, ids, params, lora=None):
        self.added.append(rid)

    def abort(self, rid):
        return None

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting or self.added)

    def stats(self) -> dict:
        return {"num_running": self.running, "num_waiting": self.waiting}


def _core(engine: _Engine, window_ms: float = 50.0) -> tuple[EngineCore, list]:
    sent: list = []
    core = EngineCore(engine, sent.append)
    core.admit_window_s = window_ms / 1000.0
    return core, sent


def _add(core: EngineCore, rid: int) -> None:
    core.handle(("add", rid, [1, 2], None, None))
    core.admit_held()


def test_an_idle_engine_admits_at_once():
    engine = _Engine()
    core, _ = _core(engine)
    _add(core, 1)
    assert engine.added == [1] and not core.held


def test_a_decoding_batch_holds_newcomers_until_the_window_ends_or_they_fill_it():
    engine = _Engine(running=2)  # 2 of 4 slots busy
    core, _ = _core(engine)
    _add(core, 1)
    assert engine.added == [] and len(core.held) == 1  # held: the batch is decoding
    time.sleep(0.06)
    core.admit_held()
    assert engine.added == [1]  # the window passed
    _add(core, 2)
    _add(core, 3)  # two held = the two free slots: admitted together, no wait
    assert engine.added == [1, 2, 3] and not core.held


def test_a_small_batch_or_a_zero_window_admits_at_once():
    engine = _Engine(running=3)
    core, _ = _core(engine)
    core.max_num_seqs = 16  # 3 running of 16: under a quarter, latency first
    _add(core, 4)
    assert engine.added == [4]
    engine = _Engine(running=1)
    core, _ = _core(engine, window_ms=0)
    _add(core, 2)
    assert engine.added == [2]


def test_a_backlog_waits_in_the_core_and_refills_free_slots_in_groups():
    engine = _Engine(running=4, waiting=3)  # batch and engine queue full: newcomers stay in the core
    core, _ = _core(engine)
    for rid in range(1, 6):
        _add(core, rid)
    time.sleep(0.06)
    core.admit_held()
    assert engine.added == [] and len(core.held) == 5
    core.max_num_seqs, core.admit_group = 16, 3
    engine.running, engine.waiting = 14, 0  # 2 free slots, 5 held: fewer free than a group
    core.admit_held()
    assert engine.added == []
    time.sleep(0.06)  # the slots stayed free for the window: they are refilled
    core.admit_held()
    assert engine.added == [1, 2]
    engine.running = 13  # 3 free, 3 held: they fill the batch, at once
    core.admit_held()
    assert engine.added == [1, 2, 3, 4, 5] and not core.held
    engine.running = 16  # (the fake engine does not count what it was given)
    for rid in range(6, 12):
        _add(core, rid)
    engine.running = 12  # 4 free >= a group of 3, 6 held: the 4 oldest at once
    core.admit_held()
    assert engine.added[5:] == [6, 7, 8, 9] and [m[1] for m in core.held] == [10, 11]


def test_a_held_request_can_be_aborted_and_drain_admits_the_rest():
    engine = _Engine(running=1)
    core, _ = _core(engine)
    _add(core, 1)
    _add(core, 2)
    core.handle(("abort", [1]))
    assert core.finished == [(1, "abort", None)] and [m[1] for m in core.held] == [2]
    core.handle(("drain",))
    assert engine.added == [2] and not core.held
    core.handle(("add", 3, [1], None, None))  # refused while draining
    assert engine.added == [2]
