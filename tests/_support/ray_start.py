"""Starting Ray in tests on a busy machine."""

from __future__ import annotations

from typing import Any

from llmray.ray_start import start_ray


def ray_init(attempts: int = 3, **kwargs: Any) -> None:
    """``ray.init``, tried again (silently) when Ray's node did not come up within its fixed 30 s (a machine
    so busy that the raylet registers late; CI's 2 cores under other test workers)."""
    start_ray(kwargs, attempts, say=lambda _line: None)
