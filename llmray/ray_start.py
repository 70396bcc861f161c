"""Starting Ray on a busy machine: ``ray.init``, again when Ray's node did not come up in time.

Ray gives its node a fixed 30 s to register (ray/_private/node.py); on a loaded machine (a 2-core CI box under
test workers, a laptop compiling) the raylet can miss it and ``ray.init`` fails with "The current node timed
out during startup". The start is then tried again, with a line saying why; the last failure names the load.
The one home of this retry for the training commands, ``llmray serve`` and the tests: it imports nothing from
llmray, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

START_ATTEMPTS = 3
NODE_TIMEOUT = "timed out during startup"  # in Ray's message when its node missed the 30 s


def start_ray(
    kwargs: dict[str, Any],
    attempts: int = START_ATTEMPTS,
    say: Callable[[str], Any] | None = None,
    ray: Any = None,
) -> None:
    """``ray.init(**kwargs)``, started again (after ``ray.shutdown()``) when the node timed out, up to
    ``attempts`` times; ``say`` gets one line per retry (default: printed). Any other failure is raised at
    once; the last timeout is a RuntimeError naming the load average. ``ray``: the module (tests pass a
    stand-in)."""
    if ray is None:
        import ray as ray_module

        ray = ray_module
    if say is None:
        say = _print
    for attempt in range(1, attempts + 1):
        try:
            with _keep_sigterm_handler():
                ray.init(**kwargs)
            return
        except Exception as e:
            if NODE_TIMEOUT not in str(e):
                raise
            ray.shutdown()
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            if attempt == attempts:
                raise RuntimeError(
                    f"Ray's node did not start within 30 s, {attempts} times (this machine's load average is "
                    f"{load:.0f}); try again when it is less busy"
                ) from e
            say(f"Ray's node did not start within 30 s (load average {load:.0f}); starting it again")


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """A Python SIGTERM handler set before ``ray.init`` (``llmray``'s: one "interrupted" line) is put back
    after it: Ray's driver puts in its own, under a C++ one that prints Ray's stack on `kill`. Without one
    (a library user's script) Ray's stay."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before):  # set again even where Python still lists it: Ray's C++ handler sits over it
            signal.signal(signal.SIGTERM, before)


def _print(line: str) -> None:
    print(line, flush=True)


RAY_LOGGERS = (
    "ray",
    "ray.data",
    "ray.serve",
    "py.warnings",
)  # Ray's, Ray Data's, Serve's and warnings' lines
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def ray_logs_to_file(log_file: str | os.PathLike[str]) -> Iterator[None]:
    """Ray's driver-side messages while the block runs (start-up and token-auth notes, Ray Data's execution
    plans, its warnings, Python warnings from Ray's code) go to ``log_file``; ERROR and up stay on stderr.
    For a command that starts Ray and prints its own progress (``llmray batch``); restored afterwards."""
    import logging
    import warnings

    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(_FORMAT))
    console = logging.StreamHandler()
    console.setLevel(logging.ERROR)
    saved = {}
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.level, logger.propagate)
        logger.handlers = [handler, console]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    fallback, logging.lastResort = logging.lastResort, handler  # ray.init drops "ray"'s handlers, then warns
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        logging.captureWarnings(False)
        logging.lastResort = fallback
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.level, logger.propagate = handlers, level, propagate
        handler.close()


# The filter process of ``native_lines_to_file``: stdin = what this process writes to fd 2, stdout = the
# console's stderr; a line matching one of the patterns (argv[2:]) goes to the file argv[1] instead. A
# partial line is passed on at once unless it may be the start of a native log line ("[" + time stamp).
_FILTER = r"""
import os, re, sys
log_file, patterns = sys.argv[1], [re.compile(p.encode()) for p in sys.argv[2:]]

def write(fd, data):
    while data:
        data = data[os.write(fd, data):]

def emit(line):
    if any(p.search(line) for p in patterns):
        try:
            with open(log_file, "ab") as f:
                f.write(line)
            return
        except OSError:
            pass
    write(1, line)

pending = b""
while chunk := os.read(0, 65536):
    *lines, pending = (pending + chunk).split(b"\n")
    for line in lines:
        emit(line + b"\n")
    if pending and not pending.startswith(b"["):
        write(1, pending)
        pending = b""
if pending:
    emit(pending)
"""


@contextlib.contextmanager
def native_lines_to_file(log_file: str | os.PathLike[str], patterns: tuple[str, ...]) -> Iterator[None]:
    """While the block runs, lines that native code in this process (Ray's C++ core worker) writes to file
    descriptor 2 and that match one of the regular expressions ``patterns`` go to ``log_file``; every other
    byte goes on to the console as before. A child process filters (in its own session: Ctrl-C leaves it
    alone; it ends when the pipe closes), so what was written before a crash still arrives. Python's own
    ``sys.stderr`` writes to the console directly meanwhile (a terminal stays a terminal for progress lines)."""
    sys.stderr.flush()
    console = os.dup(2)
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", _FILTER, os.fspath(log_file), *patterns],
        stdin=read_end, stdout=console, stderr=console, start_new_session=True,
    )  # fmt: skip
    os.close(read_end)
    python_stderr = sys.stderr
    sys.stderr = open(
        os.dup(console), "w", buffering=1, encoding=python_stderr.encoding, errors="backslashreplace"
    )  # noqa: SIM115
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        python_stderr.flush()
        os.dup2(console, 2)  # closes this process's write end of the pipe: the filter reads to its end
        os.close(console)
        sys.stderr.close()
        sys.stderr = python_stderr
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a process started in the block still holds the pipe
            pass
