"""One engine actor's timeline and totals, written as JSON for benches and operators (``stats_dir``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class EngineStats:
    """One engine's timeline (wall-clock seconds since the epoch) and totals, written as JSON to
    ``stats_dir/engine-<pid>.json`` once the engine is up and after every batch when ``stats_dir`` is set:
    ``actor_start``, ``engine_ready`` (model loaded, KV cache sized, warmed up), ``first_request`` (first row handed to the
    engine), ``last_finish``; ``rows``, ``output_tokens``, and ``engine_busy_s`` (time with requests running:
    the steady-state rate is ``output_tokens / engine_busy_s``)."""

    def __init__(self, stats_dir: str | None) -> None:
        self.path = Path(stats_dir) / f"engine-{os.getpid()}.json" if stats_dir else None
        self.data: dict[str, Any] = dict(actor_start=time.time(), rows=0, output_tokens=0, engine_busy_s=0.0)
        self._busy_since: float | None = None

    def mark(self, name: str) -> None:
        self.data[name] = time.time()

    def busy(self, running: bool) -> None:
        """Called by the engine loop: whether requests are in the engine now (its busy time adds up)."""
        now = time.time()
        if running and self._busy_since is None:
            self._busy_since = now
            self.data.setdefault("first_request", now)
        elif not running and self._busy_since is not None:
            self.data["engine_busy_s"] += now - self._busy_since
            self._busy_since = None

    def finished(self, out: Any) -> None:
        self.data["rows"] += 1
        self.data["output_tokens"] += len(out.token_ids)
        self.data["last_finish"] = time.time()

    def write(self) -> None:
        if self.path is None:
            return
        data = dict(self.data)
        if self._busy_since is not None:  # a snapshot while running: count the time up to now
            data["engine_busy_s"] += time.time() - self._busy_since
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.path)
