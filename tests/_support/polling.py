"""Waiting for a condition in tests (replicas starting, engines draining)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.25) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passes; returns its last truth value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())
