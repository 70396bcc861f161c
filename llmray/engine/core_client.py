"""Where the engine core runs: its own process (``ProcessCore``, the server's default) or a thread
(``ThreadCore``: an in-memory model, tests). Both carry ``llmray.engine.core``'s messages; ``on_message``
is called on the client's own thread, once per message (one per engine step).

Transport (measured, see docs/serving.md): two one-way OS pipes with ``multiprocessing.connection``
framing and pickle. A 512-request step message round-trips in ~1.3 ms through a pipe or a ``mp.Queue``
(socketpair: 1.7 ms) when each request is a tuple; as columns (a list of request numbers, a list of
tokens) the same message pickles in ~20 us, so the pipe is never the bottleneck and needs no extra
dependency (pyzmq is not installed in the GPU image) nor a shared-memory ring's bookkeeping.

The process is started with ``subprocess`` (a fresh interpreter: never fork, no re-import of the
replica's ``__main__``), inherits the environment (``CUDA_VISIBLE_DEVICES`` included) plus the parent's
``sys.path`` as ``PYTHONPATH`` (Ray's runtime_env working_dir and py_modules), and dies with its parent.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from llmray.engine.core import EngineCore, engine_info

logger = logging.getLogger("llmray.engine")
READY_TIMEOUT_S = 1800.0  # a cold start compiles kernels and captures graphs; progress is printed meanwhile


class ProcessCore:
    """The engine core in a child process, reached through two pipes."""

    def __init__(
        self,
        spec: dict[str, Any],
        on_message: Callable[[tuple], None],
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        self.on_message = on_message
        self.on_progress = on_progress or (lambda text: logger.info("%s", text))
        self.exit_reason: str | None = None
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        env = dict(os.environ)
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env["PYTHONPATH"] = os.pathsep.join(
            dict.fromkeys(paths + env.get("PYTHONPATH", "").split(os.pathsep))
        )
        env["LLMRAY_CORE_PARENT"] = str(os.getpid())
        # OpenMP threads that spin while they wait starve the replica's processes on a small CPU machine
        # (a tiny-model step took 30x longer on 2 busy cores); sleeping waiters cost the GPU path nothing
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # PR_SET_PDEATHSIG fires when the spawning *thread* exits: ask for it only from the main thread
        env["LLMRAY_CORE_PDEATHSIG"] = "1" if threading.current_thread() is threading.main_thread() else "0"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmray.engine.core", str(cmd_r), str(out_w)],
            pass_fds=(cmd_r, out_w),
            env=env,
            close_fds=True,
        )
        os.close(cmd_r)
        os.close(out_w)
        self._tx = Connection(cmd_w, readable=False)
        self._rx = Connection(out_r, writable=False)
        self._tx.send(spec)
        self.info: dict[str, Any] = {}
        # sends go through a thread: a full pipe (the core inside a long step) never blocks the event loop
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="llmray-core-sender", daemon=True)
        self._sender.start()

    def wait_ready(self) -> dict[str, Any]:
        """Block until the core has loaded the engine (progress lines go to ``on_progress``)."""
        self.info = self._wait_ready()
        self._reader = threading.Thread(target=self._read, name="llmray-core-reader", daemon=True)
        self._reader.start()
        return self.info

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self._rx.poll(1.0):
                if self.proc.poll() is not None:
                    break
                continue
            try:
                msg = self._rx.recv()
            except EOFError:
                break
            if msg[0] == "progress":
                self.on_progress(msg[1])
            elif msg[0] == "ready":
                return msg[1]
            elif msg[0] == "dead":
                self._reap()
                raise RuntimeError(msg[1])
        self._reap()
        raise RuntimeError(
            f"the engine core process exited during start-up (exit code {self.proc.returncode})"
        )

    def _read(self) -> None:
        try:
            while True:
                msg = self._rx.recv()
                if msg[0] == "dead":
                    self.exit_reason = msg[1]
                    continue
                self.on_message(msg)
        except (EOFError, OSError):
            pass
        except BaseException:
            logger.exception("the engine core reader failed")
        code = self.proc.wait()
        reason = self.exit_reason or f"the engine core process exited (exit code {code})"
        self.on_message(("dead", reason))

    def send(self, msg: tuple) -> None:
        self._outbox.put(msg)

    def _send_loop(self) -> None:
        outbox = self._outbox
        while True:
            msgs = [outbox.get()]
            while not outbox.empty():  # what queued meanwhile goes as one write ("many")
                msgs.append(outbox.get_nowait())
            stop = None in msgs
            msgs = [m for m in msgs if m is not None] if stop else msgs
            try:
                if msgs:
                    self._tx.send(msgs[0] if len(msgs) == 1 else ("many", msgs))
            except (OSError, ValueError):  # the core is gone (or the pipe closed): the reader reports it
                return
            if stop:
                return

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop the core: let running requests finish for up to ``drain_timeout_s``, then end it."""
        if self.proc.poll() is None:
            self.send(("drain",) if drain_timeout_s > 0 else ("shutdown",))
            try:
                self.proc.wait(timeout=max(drain_timeout_s, 5.0))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reap()

    def _reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._outbox.put(None)  # ends the sender thread
        for conn in (self._tx, getattr(self, "_rx", None)):
            if conn is not None and not conn.closed:
                conn.close()


class ThreadCore:
    """The engine core in a thread of this process (an in-memory model; tests). Same messages, unpickled."""

    def __init__(self, engine: Any, on_message: Callable[[tuple], None]) -> None:
        self.engine = engine
        self.on_message = on_message
        self.info = engine_info(engine)
        self._commands: queue.Queue = queue.Queue()
        self._core = EngineCore(engine, self._emit)
        self._thread = threading.Thread(target=self._run, name="llmray-engine", daemon=True)
        self._thread.start()

    pid = None

    def _emit(self, msg: tuple) -> None:
        self.on_message(msg)

    def _poll(self, timeout: float) -> list[tuple]:
        msgs = []
        try:
            msgs.append(self._commands.get(timeout=timeout) if timeout > 0 else self._commands.get_nowait())
            while True:
                msgs.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        return msgs

    def _run(self) -> None:
        try:
            self._core.run(self._poll)
            reason = "the engine loop is not running (shut down)"
        except BaseException as e:
            logger.exception("the engine loop died")
            reason = f"the engine loop died: {e!r}"
        self.on_message(("dead", reason))

    def send(self, msg: tuple) -> None:
        self._commands.put(msg)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        self.send(("drain",) if drain_timeout_s > 0 else ("shutdown",))
        self._thread.join(timeout=max(drain_timeout_s, 30.0))
