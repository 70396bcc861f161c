"""``llmray serve``'s console: llmray's own lines; Ray's and Serve's messages in a file whose path it prints.

The driver's "ray" and "ray.serve" loggers (Ray's start-up and token-auth warnings, Serve's "Started Serve",
"Application ... is ready" lines) write INFO and up into ``log_file``; errors still reach the console.
Serve's own processes (controller, proxy, replicas) stop logging to stderr when ``RAY_SERVE_LOG_TO_STDERR=0``
(``serve_env`` sets it for a Ray started here): their lines stay in the session's ``logs/serve/`` files.
``LLMRAY_VERBOSE=1`` keeps everything on the console.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

LOGGERS = ("ray", "ray.serve")  # "ray.serve" does not propagate to "ray" (Serve sets its own handler)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def verbose() -> bool:
    return os.environ.get("LLMRAY_VERBOSE", "") not in ("", "0")


def default_log_file() -> Path:
    return Path(tempfile.gettempdir()) / f"llmray-serve-{os.getpid()}.log"


def route_ray_logs(log_file: Path) -> None:
    """Ray's and Serve's driver-side loggers into ``log_file`` (INFO and up); ERROR and up also on stderr."""
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    file_handler.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.ERROR)
    console.setFormatter(logging.Formatter("ray %(levelname)s: %(message)s"))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):  # Ray's and Serve's console handlers, and ours from a call before
            if isinstance(h, logging.StreamHandler):  # (a FileHandler is one too)
                logger.removeHandler(h)
                if getattr(h, "_llmray", False):
                    h.close()
        for h in (file_handler, console):
            h._llmray = True  # type: ignore[union-attr]  # ours: the next call replaces it
            logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@contextlib.contextmanager
def quiet_ray_init(log_file: Path | None) -> Iterator[None]:
    """Around ``ray.init``: it drops the "ray" logger's handlers and then warns (token authentication);
    such records, which would reach Python's stderr fallback, go to ``log_file`` instead."""
    if log_file is None:
        yield
        return
    route_ray_logs(log_file)
    fallback = logging.lastResort
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(_FORMAT))
    logging.lastResort = handler
    try:
        yield
    finally:
        logging.lastResort = fallback
        handler.close()
        route_ray_logs(log_file)  # again: ray.init replaced the handlers


@contextlib.contextmanager
def quiet_shutdown(log_file: Path | None) -> Iterator[None]:
    """Around ``serve.shutdown(); ray.shutdown()``: what Ray's processes send this console meanwhile (the
    raylet's "Task ServeController.graceful_shutdown failed ... killed by `ray.kill`" when Serve stops its
    controller) goes to ``log_file``; Ray's error listener looks ``print_to_stdstream`` up per message."""
    if log_file is None:
        yield
        return
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream

    def to_file(data: dict, ignore_prefix: bool = False) -> None:
        with open(log_file, "a") as f:
            f.writelines(
                f"({data.get('actor_name') or data.get('pid')}) {ln}\n" for ln in data.get("lines") or []
            )

    ray_worker.print_to_stdstream = to_file
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = original


ENGINE_LINE = "[engine core "  # the engine core's progress lines, printed in a replica (write_console)


def unprefix_engine_lines() -> None:
    """The engine core's progress lines reach this console without Ray's ``(ServeReplica:llmray:LLMServer
    pid=N)`` prefix, like llmray's own; every other forwarded line keeps it. Wraps the handler that
    ``ray.init(log_to_driver=True)`` registered (once)."""
    import ray._private.worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    for name, handler in list(dispatcher.handlers):
        if not isinstance(handler, functools.partial) or handler.keywords.get("ignore_prefix") is not False:
            continue  # not Ray's printer of the workers' output (or already ours)

        def printer(data: dict, _handler: functools.partial = handler) -> None:
            lines = data.get("lines") or []
            ours = [ln for ln in lines if ln.startswith(ENGINE_LINE)]
            if ours:
                _handler.func({**data, "lines": ours}, ignore_prefix=True)
            rest = [ln for ln in lines if not ln.startswith(ENGINE_LINE)]
            if rest or not lines:
                _handler({**data, "lines": rest})

        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, functools.partial(printer))


def write_console(text: str) -> None:
    """A line on this process's real stdout (a Serve replica with ``RAY_SERVE_LOG_TO_STDERR=0`` turns
    ``print`` into a log record that never reaches the driver's console)."""
    stream = sys.__stdout__ or sys.stdout
    stream.write(text + "\n")
    stream.flush()
