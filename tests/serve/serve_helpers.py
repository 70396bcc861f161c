"""A local Ray + Serve running the llmray app (one per test module), replica processes, HTTP/SSE clients."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _support.polling import wait_for  # noqa: F401  (re-exported for the tests here)
from _support.ray_start import ray_init

KEY = "sk-llmray-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_under_test() -> str:
    """The engine the Serve tests run: the real one unless LLMRAY_SERVE_TEST_ENGINE=mock (debugging)."""
    return os.environ.get("LLMRAY_SERVE_TEST_ENGINE", "llmray")


class ServeSession:
    """A local Ray + Serve that a test module shares; ``deploy`` replaces the llmray app (Ray and Serve
    start once: ~10 s on two cores, more than deploying a test-double app)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def deploy(self, app_args: dict[str, Any]) -> str:
        """Run the llmray app with ``app_args`` at ``/`` (the app before it is deleted first); its base URL."""
        from ray import serve

        from llmray.serve.app import build_app

        self.delete()
        serve.run(build_app(app_args), name="llmray", route_prefix="/")
        return self.url

    @staticmethod
    def delete() -> None:
        from ray import serve

        if "llmray" in serve.status().applications:
            serve.delete("llmray")


@contextlib.contextmanager
def serve_session(metrics_port: int | None = None) -> Iterator[ServeSession]:
    """A fresh local Ray (8 logical CPUs) with Serve's HTTP proxy on a free port; shut down afterwards."""
    import ray
    from ray import serve

    if ray.is_initialized():
        ray.shutdown()
    kwargs: dict[str, Any] = {}
    if metrics_port is not None:
        kwargs = {"_metrics_export_port": metrics_port, "_system_config": {"metrics_report_interval_ms": 500}}
    tests_dir = str(Path(__file__).resolve().parents[1])  # replicas import test doubles (_support)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    ray_init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield ServeSession(f"http://127.0.0.1:{port}")
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def serve_app(app_args: dict[str, Any], metrics_port: int | None = None) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:PORT``) of the llmray app on a fresh local Ray."""
    with serve_session(metrics_port) as session:
        yield session.deploy(app_args)


def llm_server_handle() -> Any:
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name="llmray")


def replica_count(deployment: str = "LLMServer") -> int:
    """RUNNING replicas of a deployment of the llmray app."""
    from ray import serve

    status = serve.status().applications["llmray"].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def sse_data(lines: Iterator[str]) -> Iterator[Any]:
    """Decoded ``data:`` payloads of an SSE stream (``"[DONE]"`` passed through as the string)."""
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            yield payload if payload == "[DONE]" else json.loads(payload)


def engine_stats() -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name="llmray").stats.remote().result(timeout_s=30)


def replica_actors(deployment: str = "LLMServer") -> dict[str, Any]:
    """Replica actor handles of a deployment of the llmray app, by actor name (live or not yet cleaned up)."""
    import ray

    prefix = f"SERVE_REPLICA::llmray#{deployment}#"
    out = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(prefix):
            with contextlib.suppress(ValueError):
                out[entry["name"]] = ray.get_actor(entry["name"], namespace=entry["namespace"])
    return out


def _getpid(_: Any) -> int:
    import os

    return os.getpid()


def _ship_by_value() -> None:
    """Replica processes cannot import this test module: send its functions by value."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def replica_pids(deployment: str = "LLMServer") -> list[int]:
    """PIDs of the responsive replica actors of a deployment (asked through ``__ray_call__``)."""
    import ray

    _ship_by_value()
    pids = []
    for actor in replica_actors(deployment).values():
        with contextlib.suppress(Exception):
            pids.append(ray.get(actor.__ray_call__.remote(_getpid), timeout=10))
    return sorted(pids)


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


@dataclass
class StreamResult:
    """What one streaming client saw."""

    status: int = 0
    chunks: list[dict] = field(default_factory=list)  # decoded data: events (not [DONE])
    done: bool = False  # saw data: [DONE]
    disconnected: bool = False  # the client hung up on purpose
    error: dict | None = None  # an in-band SSE error event or the JSON error body of a non-200
    exception: str | None = None  # a transport error (connection reset, timeout)
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return "".join(c["choices"][0].get("text", "") for c in self.chunks if c.get("choices"))


async def stream_completion(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    disconnect_after: int | None = None,
    timeout_s: float = 120.0,
) -> StreamResult:
    """POST a streamed /v1/completions; hang up after ``disconnect_after`` content chunks if given."""
    res = StreamResult()
    t0 = time.perf_counter()
    try:
        async with client.stream(
            "POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=timeout_s
        ) as r:
            res.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                res.error = r.json().get("error")
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: ") :]
                if payload == "[DONE]":
                    res.done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    res.error = event["error"]
                    continue
                res.chunks.append(event)
                if (
                    disconnect_after is not None
                    and sum(bool(c["choices"]) for c in res.chunks) >= disconnect_after
                ):
                    res.disconnected = True
                    break  # leaving the context closes the connection mid-stream
    except (httpx.HTTPError, OSError) as e:
        res.exception = f"{type(e).__name__}: {e}"
    finally:
        res.seconds = time.perf_counter() - t0
    return res


def fake_adapter(path: Path) -> Path:
    """A LoRA adapter directory the mock engine accepts (it checks the two file names only)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path
