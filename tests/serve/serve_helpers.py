"""Start a local Ray + Serve running the llmray app (one per test module), and small HTTP helpers."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _support.polling import wait_for  # noqa: F401  (re-exported for the tests here)
from _support.ray_start import ray_init

KEY = "sk-llmray-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_under_test() -> str:
    """The engine the Serve tests run: the real one unless LLMRAY_SERVE_TEST_ENGINE=mock (debugging)."""
    return os.environ.get("LLMRAY_SERVE_TEST_ENGINE", "llmray")


@contextlib.contextmanager
def serve_app(app_args: dict[str, Any], metrics_port: int | None = None) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:PORT``) of the llmray app on a fresh local Ray."""
    import ray
    from ray import serve

    from llmray.serve.app import build_app

    if ray.is_initialized():
        ray.shutdown()
    kwargs: dict[str, Any] = {}
    if metrics_port is not None:
        kwargs = {"_metrics_export_port": metrics_port, "_system_config": {"metrics_report_interval_ms": 500}}
    tests_dir = str(
        Path(__file__).resolve().parents[1]
    )  # replicas import test doubles (_support.mock_engine)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    ray_init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_args), name="llmray", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


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
