"""Starting Ray in tests on a busy machine."""

from __future__ import annotations

from typing import Any


def ray_init(attempts: int = 3, **kwargs: Any) -> None:
    """``ray.init``, tried again when Ray's node did not come up within its fixed 30 s (a machine so busy
    that the raylet registers late; CI's 2 cores under other test workers)."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(**kwargs)
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
            ray.shutdown()
