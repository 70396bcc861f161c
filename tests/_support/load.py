"""Streaming HTTP load for autoscaling tests: a few clients asking again and again until told to stop."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import httpx


@contextlib.contextmanager
def streaming_load(url: str, bodies: list[dict], api_key: str) -> Iterator[list[int]]:
    """One thread per body POSTs it (``"stream": true``) to ``url`` again and again, reading each stream to
    its end, until the block exits; yields the list of HTTP statuses seen (filled while the block runs)."""
    stop, statuses = threading.Event(), []

    def client(body: dict) -> None:
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {api_key}"}) as http:
            while not stop.is_set():
                with http.stream("POST", url, json=body) as r:
                    statuses.append(r.status_code)
                    for _ in r.iter_lines():
                        if stop.is_set():
                            break

    threads = [threading.Thread(target=client, args=(body,), daemon=True) for body in bodies]
    for t in threads:
        t.start()
    try:
        yield statuses
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
