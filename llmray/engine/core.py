"""The engine core: the step loop, fed by commands and answering with one message per step.

``EngineCore`` wraps an ``LLMEngine`` (model, scheduler, KV cache, adapters) and speaks a small protocol of
tuples (pickled when the core runs in its own process, passed as is when it runs in a thread)::

    in:  ("add", rid, prompt_ids, SamplingParams, lora)   ("abort", [rid, ...])   ("many", [command, ...])
         ("call", call_id, name, args)  name in add_lora | remove_lora | list_loras; answered in order,
              add_lora's files read on a loader thread while the loop steps
         ("drain",)  finish what runs, refuse new requests, then exit     ("shutdown",)
    out: ("ready", info)  ("progress", text)
         ("step", rids, tokens, finished, logprobs, stats)   one per step: each running request's NEW token
              (rids[i] got tokens[i]); finished = [(rid, finish_reason, stop_reason)]; logprobs = {rid: {id:
              logprob}} or None; stats = LLMEngine.stats() (the replica's metrics come from these)
         ("error", rid, message, param)   the request was refused (param: the field at fault)
         ("failed", [rid, ...], message)  a step raised: these requests failed, the engine keeps serving
         ("reply", call_id, ok, result)   ("dead", message)

``python -m llmray.engine.core --prewarm SPEC LOCK PID`` (``llmray serve`` starts it on a GPU machine while
Ray starts) builds an engine once to fill the Triton cache; a core waits for it before loading the model.

Run as ``python -m llmray.engine.core FD_IN FD_OUT`` (started by ``llmray.engine.core_client``): the first
message on FD_IN is the spec ``{"model_dir", "engine_kwargs", "loras", "engine_factory"}``. The process
exits when its parent dies (PR_SET_PDEATHSIG where the parent asked for it, a parent-pid watchdog, and EOF
on the command pipe), so a replica killed with SIGKILL never leaves an orphan holding the GPU.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

IDLE_POLL_S = 0.05  # how long an idle core waits for a command before looking again
LOADING_POLL_S = 0.005  # the same while an adapter loads on the loader thread
ADMIT_WINDOW_MS = 20.0  # newcomers wait <= this to enter a decoding batch together ($LLMRAY_ADMIT_WINDOW_MS)


class EngineCore:
    """Drives one ``LLMEngine``; ``send`` receives every outgoing message."""

    def __init__(self, engine: Any, send: Callable[[tuple], None]) -> None:
        engine.detokenize = False  # the front-end detokenizes and applies stop strings
        engine.delta_outputs = True
        engine.stream_outputs = True
        self.engine = engine
        self.send = send
        self.failures = 0  # consecutive failed steps
        self.finished: list[tuple] = []  # aborts to report with the next message
        self.draining = False
        self.stopped = False
        # adapter commands run in order; an adapter's files are read on a worker thread while the loop steps
        self._calls: deque[list] = deque()  # [call_id, name, args, Future | None]
        self._loader: ThreadPoolExecutor | None = None
        self.timer: LoopTimer | None = None
        self.held: list[tuple] = []  # "add" commands not yet handed to the engine (admit_held)
        self.held_at: list[float] = []  # when each arrived
        self.free_since: float | None = None  # since when a backlog of held requests has slots to fill
        self.admit_window_s = float(os.environ.get("LLMRAY_ADMIT_WINDOW_MS", ADMIT_WINDOW_MS)) / 1000.0
        cfg = getattr(engine, "config", None)
        max_num_seqs = getattr(cfg, "max_num_seqs", None) or getattr(engine, "max_num_seqs", None)
        self.max_num_seqs = int(max_num_seqs or 256)
        self.admit_group = int(os.environ.get("LLMRAY_ADMIT_GROUP", max(1, self.max_num_seqs // 8)))  # _due

    # --- commands ---------------------------------------------------------------------------------
    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "many":  # commands the front-end queued together
            for m in msg[1]:
                self.handle(m)
        elif kind == "add":
            if self.draining:
                self.send(("error", msg[1], "the engine is shutting down; retry the request", None))
                return
            self.held.append(msg)
            self.held_at.append(time.monotonic())
            self.admit_held()  # at once unless a large batch is decoding (then the loop admits it)
        elif kind == "abort":
            for rid in msg[1]:
                at = next((i for i, m in enumerate(self.held) if m[1] == rid), None)
                if at is not None:
                    del self.held[at], self.held_at[at]
                    self.finished.append((rid, "abort", None))
                elif self.engine.abort(rid) is not None:
                    self.finished.append((rid, "abort", None))
        elif kind == "call":
            _, call_id, name, args = msg
            self._calls.append([call_id, name, args, None])
            self.advance_calls()
        elif kind == "drain":
            self.draining = True
            self.admit_held(force=True)
        elif kind == "shutdown":
            self.stopped = True

    def admit_held(self, force: bool = False) -> None:
        """Hand held requests to the engine: at once when it is idle or decodes a small batch (under a quarter
        of ``max_num_seqs``) or when they fill its free slots, else after ``admit_window_s`` (``_due``).
        Why: requests that enter one by one while a large batch decodes make many of its steps mixed prefill
        steps (slower for the whole batch: 4.4 instead of 3.7 ms per step at 256 streams on the H200)."""
        if not self.held:
            return
        n, engine = len(self.held), self.engine
        if not force and engine.has_unfinished() and self.admit_window_s > 0:
            st = engine.stats()
            if 4 * st["num_running"] >= self.max_num_seqs:  # a small batch's steps are cheap: latency first
                n = self._due(self.max_num_seqs - st["num_running"] - st["num_waiting"], time.monotonic())
        if n <= 0:
            return
        held, self.held, self.held_at, self.free_since = self.held[:n], self.held[n:], self.held_at[n:], None
        for _, rid, ids, params, lora in held:
            try:
                engine.add_request(rid, ids, params, lora)
            except ValueError as e:  # the client's mistake: RequestError names the field
                self.send(("error", rid, str(e), getattr(e, "param", None)))
            except Exception as e:  # anything else fails this request alone, never the core
                self.send(("failed", [rid], f"the engine could not add the request: {type(e).__name__}: {e}"))

    def _due(self, free: int, now: float) -> int:
        """How many held requests enter a large batch with ``free`` open slots. With a backlog (more held than
        free slots) the engine gets only what its batch takes, once ``admit_group`` slots are free or the
        first was free for the window (its queue stays empty: refills come in groups, not one per step)."""
        if (held := len(self.held)) and free <= 0:  # batch and queue full: newcomers wait here
            self.free_since = None
            return 0
        if held <= free:  # they fit: at once when they fill the batch, else after the window
            return held if held == free or now - self.held_at[0] >= self.admit_window_s else 0
        self.free_since = now if self.free_since is None else self.free_since
        return free if free >= self.admit_group or now - self.free_since >= self.admit_window_s else 0

    def advance_calls(self) -> None:
        """Answer the adapter commands whose turn it is. ``add_lora`` reads and validates the adapter on the
        loader thread (``LoraManager.load`` changes no state) and registers it here once read, so a load
        never stalls the steps of running requests; later commands wait for it (they stay in order)."""
        lora = getattr(self.engine, "lora", None)
        while self._calls:
            call = self._calls[0]
            call_id, name, args, pending = call
            reply: tuple[str, Any, bool, Any]
            try:
                if name == "add_lora" and lora is not None:
                    if pending is None:
                        if self._loader is None:
                            self._loader = ThreadPoolExecutor(1, thread_name_prefix="llmray-lora-load")
                        call[3] = self._loader.submit(lora.load, *args)
                        return
                    if not pending.done():
                        return
                    result = self.call_add_lora(args[0], pending.result())
                else:
                    result = getattr(self, f"call_{name}")(*args)
                reply = ("reply", call_id, True, result)
            except Exception as e:  # KeyError / AdapterError travel back by type name and message
                reply = ("reply", call_id, False, (type(e).__name__, str(e)))
            self._calls.popleft()
            self.send(reply)

    def call_add_lora(self, name: str, path: str | Any) -> list[str]:
        self.engine.add_lora(name, path)  # a directory, or the adapter the loader thread read
        return self.engine.list_loras()

    def call_remove_lora(self, name: str) -> list[str]:
        self.engine.remove_lora(name)
        return self.engine.list_loras()

    def call_list_loras(self) -> list[str]:
        return self.engine.list_loras()

    # --- the loop ---------------------------------------------------------------------------------
    def step(self) -> None:
        """One engine step and its message; a failed step fails its requests (twice in a row: raises)."""
        try:
            outs = self.engine.step()
            if self.timer is not None:
                self.timer.mark("engine_step")
        except Exception as e:
            self.failures += 1
            if self.failures > 1:
                raise
            ids = self.engine.abort_all()
            self.send(("failed", ids, f"the engine step failed: {e!r}"))
            return
        self.failures = 0
        for rid, message in self.engine.pop_failed():  # a request that failed alone (issue 17 item 5)
            self.send(("failed", [rid], message))
        rids = [o[0] for o in outs]
        tokens = [o[1] for o in outs]
        finished = self.finished + [(o[0], o[2], o[3]) for o in outs if o[2] is not None]
        lps = {o[0]: o[4] for o in outs if o[4] is not None} or None
        self.finished, stats = [], self.engine.stats()
        if self.held:  # requests the core holds wait too (the metrics' queue length)
            stats = {**stats, "num_waiting": stats["num_waiting"] + len(self.held)}
        self.send(("step", rids, tokens, finished, lps, stats))

    def run(self, poll: Callable[[float], list[tuple]]) -> None:
        """Step without pause while there is work; ``poll(timeout)`` returns the commands that arrived."""
        engine = self.engine
        self.send(("step", [], [], [], None, engine.stats()))  # the first stats
        timer = self.timer = LoopTimer() if os.environ.get("LLMRAY_CORE_TIMING") else None
        while not self.stopped:
            idle_s = LOADING_POLL_S if self._calls else IDLE_POLL_S
            if timer is not None:
                timer.mark("work")
            msgs = poll(0.0 if engine.has_unfinished() else idle_s)
            if timer is not None:
                timer.mark("poll")
            for msg in msgs:
                self.handle(msg)
            self.admit_held()
            if self._calls:
                self.advance_calls()
            if engine.has_unfinished():
                if timer is not None:
                    timer.mark("commands")
                self.step()
                if timer is not None:
                    timer.mark("message", steps=1)
            elif msgs or self.finished:  # idle after commands (e.g. an abort): report it and fresh stats
                self.send(("step", [], [], self.finished, None, engine.stats()))
                self.finished = []
            if self.draining and not engine.has_unfinished():
                break


class LoopTimer:
    """``LLMRAY_CORE_TIMING=1``: where the core loop's time goes (seconds per phase, steps per second),
    printed to stderr (the replica's log) every 2 s while it steps."""

    def __init__(self) -> None:
        self.t = self.t_print = time.perf_counter()
        self.totals: dict[str, float] = {}
        self.steps = 0

    def mark(self, phase: str, steps: int = 0) -> None:
        t = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + t - self.t
        self.t, self.steps = t, self.steps + steps
        if t - self.t_print >= 2.0:
            if self.steps:
                parts = " ".join(f"{k}={v:.3f}s" for k, v in sorted(self.totals.items()))
                print(f"[engine core timing] {t - self.t_print:.1f}s: {self.steps} steps {parts}",
                      file=sys.stderr, flush=True)  # fmt: skip
            self.totals, self.steps, self.t_print = {}, 0, t


def engine_info(engine: Any) -> dict[str, Any]:
    """What the front-end needs to know about the engine (sent with "ready")."""
    return {
        "max_model_len": int(engine.max_model_len),
        "vocab_size": int(engine.model_config.vocab_size),
        "eos_token_id": engine.eos_token_id,
        "loras": engine.list_loras(),
        "num_total_blocks": engine.scheduler.block_manager.num_blocks,
        "pid": os.getpid(),
    }


def load_factory(spec: str) -> Callable[..., Any]:
    """``"module:callable"`` -> the callable (an engine factory: (model_dir, loras, **kwargs) -> LLMEngine)."""
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"engine_factory must be 'module:callable', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _die_with_parent(parent_pid: int, use_pdeathsig: bool) -> None:
    if use_pdeathsig and sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="llmray-core-watchdog", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(3)


PREWARM_LOCK_ENV = "LLMRAY_PREWARM_LOCK"  # a file a kernel pre-warm holds locked while it runs
PREWARM_WAIT_S = 120.0  # a core waits at most this long for it


def prewarm(spec: dict[str, Any], lock_path: str, parent_pid: int) -> int:
    """Build (and drop) an engine with the core's settings but a small KV cache, holding ``lock_path``
    locked meanwhile: its Triton kernels land in the shared cache while Ray and Serve start, and the core
    (which waits for the lock, so the two never share the device's memory) starts warm."""
    import fcntl

    _die_with_parent(parent_pid, True)
    lock = open(lock_path, "a+")  # noqa: SIM115 - held until this process exits
    fcntl.flock(lock, fcntl.LOCK_EX)
    t0 = time.perf_counter()
    from llmray.engine.llm import build_engine

    kw = spec["engine_kwargs"]
    # the kernels, not the cache, are the point: blocks for one longest sequence (the engine checks that)
    blocks = max(256, (kw.get("max_model_len") or 40960) // kw.get("block_size", 16) + 16)
    kwargs = {**kw, "num_kv_blocks": blocks}
    try:
        build_engine(spec["model_dir"], **kwargs)
    except Exception as e:  # the core compiles what this could not; nothing is lost but time
        print(f"llmray: kernel pre-warm failed ({type(e).__name__}: {e})", flush=True)
        return 1
    print(f"llmray: kernels compiled while Ray started ({time.perf_counter() - t0:.1f}s)", flush=True)
    return 0


def _wait_for_prewarm(progress: Callable[[str], None]) -> None:
    """Wait (bounded) until a running kernel pre-warm (``llmray serve`` started it) has finished."""
    path = os.environ.get(PREWARM_LOCK_ENV)
    if not path or not os.path.exists(path):
        return
    import fcntl

    with open(path) as lock:
        deadline, told = time.monotonic() + PREWARM_WAIT_S, False
        while time.monotonic() < deadline:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return  # released when the file closes
            except OSError:
                if not told:
                    progress("waiting for the kernel pre-warm to finish (it compiles what this core needs)")
                    told = True
                time.sleep(0.2)


def main(argv: list[str]) -> int:
    from multiprocessing.connection import Connection

    if argv[0] == "--prewarm":  # python -m llmray.engine.core --prewarm SPEC_JSON LOCK PARENT_PID
        import json

        return prewarm(json.loads(argv[1]), argv[2], int(argv[3]))
    fd_in, fd_out = int(argv[0]), int(argv[1])
    _die_with_parent(int(os.environ["LLMRAY_CORE_PARENT"]), os.environ.get("LLMRAY_CORE_PDEATHSIG") == "1")
    rx = Connection(fd_in, writable=False)
    tx = Connection(fd_out, readable=False)
    try:
        spec = rx.recv()
    except EOFError:
        return 0
    t0 = time.perf_counter()

    def progress(text: str) -> None:
        tx.send(("progress", f"[engine core {os.getpid()}] {text} ({time.perf_counter() - t0:.1f}s)"))

    try:
        if not spec.get("engine_factory"):
            _wait_for_prewarm(progress)
        progress("loading the model")
        if spec.get("engine_factory"):
            engine = load_factory(spec["engine_factory"])(
                spec["model_dir"], spec["loras"], **spec["engine_kwargs"]
            )
        else:
            from llmray.engine.llm import build_engine

            engine = build_engine(spec["model_dir"], loras=spec["loras"], **spec["engine_kwargs"])
        progress(f"engine ready: {engine.scheduler.block_manager.num_blocks} KV blocks")
    except BaseException as e:
        tx.send(("dead", f"the engine could not start: {type(e).__name__}: {e}"))
        return 1
    tx.send(("ready", engine_info(engine)))
    core = EngineCore(engine, tx.send)

    def poll(timeout: float) -> list[tuple]:
        msgs: list[tuple] = []
        if rx.poll(timeout):
            msgs.append(rx.recv())
            while rx.poll(0):
                msgs.append(rx.recv())
        return msgs

    try:
        core.run(poll)
    except (EOFError, OSError):  # the front-end is gone: nobody to serve
        return 0
    except BaseException as e:
        try:
            tx.send(("dead", f"the engine loop died: {e!r}"))
        except OSError:
            pass
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
