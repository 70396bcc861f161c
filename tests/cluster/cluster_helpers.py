"""A real local Ray head for the cluster tests, isolated from every other Ray on the machine.

Several engineers (and CI jobs) share this machine, so nothing here uses ``ray stop`` (it kills every Ray
process of the user) or the default ports/temp dir: each head gets free ports and its own ``--temp-dir``,
and ``stop()`` kills exactly the processes that carry that temp dir on their command line plus their
descendants (workers rename themselves ``ray::...`` but stay children of their raylet).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A port free right now and not handed out before by this process (the OS may reuse one at once)."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


# Generous timeouts: the dashboard answers in milliseconds on an idle machine and in seconds on a busy 2-core one.
def http_json(url: str, data: dict | None = None, timeout: float = 60.0, method: str | None = None) -> Any:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def http_text(url: str, timeout: float = 60.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def wait_for(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - polled services may not be up yet; re-raised below
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(
        f"timed out after {timeout:.0f}s waiting for {what}"
        + (f" (last error: {last_exc!r})" if last_exc else "")
    )


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ``ray``/``serve`` CLIs and the processes they start: this venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray >= 2.52 turns on token auth when ~/.ray/auth_token exists (another local ray.init may have
    # written it); pin the mode so the REST calls below behave the same on every machine.
    env["RAY_AUTH_MODE"] = "disabled"
    # export metrics every 5 s, not every 10 s (every second cost the agent ~0.07 of a core for the head's life)
    env["RAY_metrics_report_interval_ms"] = "5000"
    env.update(extra or {})
    return env


class LocalRayHead:
    """``ray start --head`` on free ports in a private temp dir; ``stop()`` kills only its own processes."""

    def __init__(
        self,
        num_cpus: int = 8,
        num_gpus: int = 0,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ):
        self.temp_dir = tempfile.mkdtemp(prefix="lr9-", dir="/tmp")  # short: unix socket paths < 108 chars
        self.gcs_port, self.dashboard_port, self.metrics_port = free_port(), free_port(), free_port()
        self.env = ray_env(env)
        self.cmd = [
            str(BIN / "ray"), "start", "--head", "--disable-usage-stats",
            f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
            f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            f"--metrics-export-port={self.metrics_port}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={self.temp_dir}", "--object-store-memory=300000000",
            *(args or []),
        ]  # fmt: skip

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        import ray._private.services

        return f"{ray._private.services.get_node_ip_address()}:{self.gcs_port}"

    def start(self, timeout: float = 300.0, attempts: int = 2) -> LocalRayHead:
        """``ray start --head`` and wait for the dashboard; once more when it fails to come up (``ray start``
        gives the raylet a fixed 30 s to register: an overloaded 2-core machine can miss it)."""
        for attempt in range(attempts):
            try:
                proc = subprocess.run(  # timeout > RAY_DASHBOARD_STARTUP_TIMEOUT_S (conftest)
                    self.cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.temp_dir
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"ray start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
                wait_for(
                    lambda: http_json(f"{self.dashboard_url}/api/version"), 180, what="the Ray dashboard"
                )
                return self
            except BaseException as e:
                self._kill()
                if attempt == attempts - 1 or not isinstance(e, (RuntimeError, TimeoutError)):
                    self.stop()
                    raise
                print(f"ray start failed, trying once more: {str(e)[-2000:]}", file=sys.stderr, flush=True)
        raise AssertionError("unreachable")

    def run_cli(self, args: list[str], timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=cwd)

    def alive_nodes(self) -> list[dict[str, Any]]:
        """Alive nodes through the dashboard's state API: ``[{node_id, resources_total, labels, ...}]``."""
        reply = http_json(f"{self.dashboard_url}/api/v0/nodes?limit=100&detail=true")
        return [n for n in reply["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def _own_processes(self) -> list[psutil.Process]:
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in part for part in (p.info["cmdline"] or [])):
                    roots.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        procs = {p.pid: p for p in roots}
        for p in roots:
            try:
                procs.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        procs.pop(os.getpid(), None)
        return list(procs.values())

    def stop(self) -> None:
        self._kill()
        if not os.environ.get("LLMRAY_KEEP_RAY_TMP"):  # set it to keep the session logs for debugging
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _kill(self) -> None:
        procs = self._own_processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)

    def __enter__(self) -> LocalRayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_configs() -> list[tuple[str, dict]]:
    """``(manifest name, parsed serveConfigV2)`` for every RayService under cluster/."""
    out = []
    for path in sorted((REPO / "cluster").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "RayService":
                out.append((path.name, yaml.safe_load(doc["spec"]["serveConfigV2"])))
    return out


def local_serve_config(config: dict, model_dir: Path, lora_root: Path) -> dict:
    """The manifest's serve config pointed at a local checkpoint (what the cluster tests deploy)."""
    config = copy.deepcopy(config)
    positions = json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]
    for app in config["applications"]:
        app["args"]["model"] = str(model_dir)
        if "lora_root" in app["args"]:
            app["args"]["lora_root"] = str(lora_root)
        # the manifest's context (8192 for Qwen3-0.6B) is longer than the tiny model's: serve refuses that
        for args in (app["args"], app["args"].get("engine_kwargs") or {}):
            if "max_model_len" in args:
                args["max_model_len"] = min(int(args["max_model_len"]), positions)
    return config
