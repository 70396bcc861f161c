"""``build_app`` arguments and the ``llmray serve`` flags (no Ray cluster needed)."""

from __future__ import annotations

import argparse

import pytest
from ray import serve

from llmray.serve.app import ServeArgs, build_app
from llmray.serve.cli import DEFAULT_METRICS_PORT, add_cli, args_to_app_args, metrics_url, ray_init_kwargs


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_cli_flags_map_to_app_args(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRAY_API_KEY", "from-env")
    ns = parse(["--model", str(tmp_path), "--lora", "a=/x", "--lora", "b=/y", "--max-replicas", "3",
                "--max-num-seqs", "32", "--enforce-eager", "--port", "9000"])  # fmt: skip
    assert ns.func.__name__ == "run_serve" and ns.port == 9000 and ns.host == "127.0.0.1"
    args = args_to_app_args(ns)
    assert args["loras"] == {"a": "/x", "b": "/y"} and args["api_key"] == "from-env"
    assert args["engine_kwargs"] == {"max_num_seqs": 32, "enforce_eager": True}
    assert (args["min_replicas"], args["max_replicas"]) == (1, 3)
    assert isinstance(build_app(args), serve.Application)
    with pytest.raises(SystemExit):
        parse(["--model", str(tmp_path), "--lora", "no-equals-sign"])


def test_metrics_port_reaches_the_local_ray_start_and_its_url_is_found(tmp_path):
    """A local Ray exports metrics on a fixed, printed port (Ray's own default is random)."""
    kw = ray_init_kwargs(parse(["--model", str(tmp_path)]))
    assert kw["_metrics_export_port"] == DEFAULT_METRICS_PORT == 8080
    assert (
        ray_init_kwargs(parse(["--model", str(tmp_path), "--metrics-port", "9101"]))["_metrics_export_port"]
        == 9101
    )
    nodes = [
        {"Alive": False, "NodeManagerAddress": "10.0.0.5", "MetricsExportPort": 1111},
        {"Alive": True, "NodeManagerAddress": "10.0.0.9", "MetricsExportPort": 2222},
        {"Alive": True, "NodeManagerAddress": "10.0.0.5", "MetricsExportPort": 8080},
    ]
    assert metrics_url(nodes, "10.0.0.5") == "http://10.0.0.5:8080/metrics"
    assert metrics_url(nodes, "10.0.0.7") is None


def test_build_app_validates(tmp_path):
    with pytest.raises(ValueError, match="max_replicas=1 is below min_replicas=2"):
        build_app({"model": str(tmp_path), "min_replicas": 2})
    with pytest.raises(ValueError, match="does not exist"):
        build_app({"model": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="unknown_key"):
        build_app({"model": str(tmp_path), "unknown_key": 1})


def test_lora_root_lists_adapters(tmp_path):
    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "not-an-adapter").mkdir()
    args = ServeArgs(model=str(tmp_path), lora_root=str(tmp_path), loras={"gamma": "/g"})
    assert args.lora_dirs() == {
        "gamma": "/g",
        "alpha": str(tmp_path / "alpha"),
        "beta": str(tmp_path / "beta"),
    }


def test_serve_env_for_a_local_ray(tmp_path, monkeypatch):
    """`llmray serve` starting its own Ray: replica code on Serve's loop, HAProxy when asked (or usable), and
    an environment variable the user set always wins."""
    from llmray.serve.cli import serve_env

    keys = (
        "RAY_SERVE_ENABLE_HA_PROXY",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD",
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S",
    )
    for key in keys:  # (tests/conftest.py sets the ready timeout for every Ray a test starts)
        monkeypatch.delenv(key, raising=False)
    env = serve_env(parse(["--model", str(tmp_path), "--haproxy"]))
    assert (
        env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    )
    assert env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "30"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in serve_env(parse(["--model", str(tmp_path), "--no-haproxy"]))
    monkeypatch.setenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1")
    assert "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD" not in serve_env(parse(["--model", str(tmp_path)]))
    args = args_to_app_args(parse(["--model", str(tmp_path), "--ingress-mode", "separate"]))
    assert args["ingress_mode"] == "separate" and "ingress_mode" not in args_to_app_args(
        parse(["--model", str(tmp_path)])
    )


def test_kernel_prewarm_decision_and_the_core_waiting_for_it(tmp_path, monkeypatch):
    """`llmray serve` pre-warms only for llmray's engine on a Ray it starts (never with --no-prewarm, a
    stand-in engine or RAY_ADDRESS); an engine core waits while the pre-warm holds its lock file."""
    import fcntl
    import threading
    import time

    from llmray.engine import core
    from llmray.serve.cli import start_prewarm

    assert start_prewarm(parse(["--model", str(tmp_path), "--no-prewarm"])) is None
    assert start_prewarm(parse(["--model", str(tmp_path), "--prewarm", "--engine-factory", "m:f"])) is None
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert start_prewarm(parse(["--model", str(tmp_path), "--prewarm"])) is None

    lock = tmp_path / "prewarm.lock"
    lock.touch()
    monkeypatch.setenv(core.PREWARM_LOCK_ENV, str(lock))
    said: list[str] = []
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the pre-warm is running
        waiter = threading.Thread(target=core._wait_for_prewarm, args=(said.append,))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and said  # the core waits, and says why
        fcntl.flock(held, fcntl.LOCK_UN)  # the pre-warm ended
        waiter.join(5)
    assert not waiter.is_alive()


def test_ray_and_serve_messages_go_to_a_named_file_not_the_console(tmp_path, capfd, monkeypatch):
    """`llmray serve`: Ray's token-auth warning (logged while ray.init has dropped the "ray" logger's
    handlers) and Serve's driver INFO lines land in the log file; errors still reach the console; Serve's
    processes stop logging to stderr; the engine core's progress still reaches stdout in a replica whose
    print Serve redirected."""
    import builtins
    import logging

    from ray._private.authentication.authentication_token_setup import _warn_token_auth_enabled

    from llmray.serve.cli import serve_env
    from llmray.serve.ray_logs import quiet_ray_init, write_console

    saved = {
        n: (lg.handlers[:], lg.level, lg.propagate)
        for n in ("ray", "ray.serve")
        for lg in [logging.getLogger(n)]
    }
    log = tmp_path / "ray.log"
    try:
        with quiet_ray_init(log):
            for name in ("ray", "ray.serve"):
                logging.getLogger(name).handlers.clear()  # what ray.init does before it warns
            _warn_token_auth_enabled()
        logging.getLogger("ray.serve").info("Started Serve in namespace")
        logging.getLogger("ray.serve").error("a real problem")
        for h in logging.getLogger("ray").handlers:
            h.flush()
        text = log.read_text()
        assert "Token authentication is enabled" in text and "Started Serve" in text
        err = capfd.readouterr().err
        assert "Token authentication" not in err and "Started Serve" not in err and "a real problem" in err
    finally:
        for name, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate

    monkeypatch.delenv("RAY_SERVE_LOG_TO_STDERR", raising=False)
    monkeypatch.delenv("LLMRAY_VERBOSE", raising=False)
    assert serve_env(parse(["--model", str(tmp_path)]))["RAY_SERVE_LOG_TO_STDERR"] == "0"
    monkeypatch.setenv("LLMRAY_VERBOSE", "1")
    assert "RAY_SERVE_LOG_TO_STDERR" not in serve_env(parse(["--model", str(tmp_path)]))

    monkeypatch.setattr(builtins, "print", lambda *a, **k: None)  # Serve's redirected print, roughly
    write_console("[engine core 1] engine ready")
    monkeypatch.undo()
    assert "[engine core 1] engine ready" in capfd.readouterr().out


def test_ctrl_c_landing_on_another_thread_stops_serve_at_once(tmp_path):
    """A terminal's SIGINT can land on any of Ray's threads: `llmray serve`'s wait must still end at once
    (it slept on in ``time.sleep(3600)`` for a minute). A fresh process: the signal goes to a thread."""
    import subprocess
    import sys

    code = (
        "import signal, sys, threading, time\n"
        "from llmray.serve.cli import wait_for_stop\n"
        "def hit():\n"
        "    time.sleep(0.3)\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # this thread, not the main one\n"
        "threading.Thread(target=hit).start()\n"
        "t0 = time.monotonic()\n"
        "try:\n"
        "    wait_for_stop(poll_s=30)\n"
        "except KeyboardInterrupt:\n"
        "    print(f'stopped {time.monotonic() - t0:.1f}')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("stopped "), proc.stdout + proc.stderr[-2000:]
    assert float(proc.stdout.split()[1]) < 5


def test_rays_messages_while_serve_stops_go_to_the_log_file(tmp_path, capfd):
    """After Ctrl-C, the raylet's "Task ServeController.graceful_shutdown failed ..." (Serve killing its own
    controller) lands in the log file, not under `llmray: shutting down`."""
    import ray._private.worker as ray_worker

    from llmray.serve.ray_logs import quiet_shutdown

    line = (
        "Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task will "
        "be retried. Error: The actor is dead because it was killed by `ray.kill`."
    )
    log = tmp_path / "serve.log"
    original = ray_worker.print_to_stdstream
    with quiet_shutdown(log):
        ray_worker.print_to_stdstream(
            {"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False
        )
    assert ray_worker.print_to_stdstream is original
    out, err = capfd.readouterr()
    assert "graceful_shutdown" not in out + err
    assert f"(raylet) {line}" in log.read_text()


def test_the_engine_cores_progress_lines_come_without_rays_prefix(capsys, monkeypatch):
    """A replica's "[engine core N] loading the model" lines read as llmray's own (they carried Ray's
    "(ServeReplica:llmray:LLMServer pid=N)" prefix); any other forwarded line keeps the prefix."""
    import functools

    import ray._private.worker as ray_worker

    from llmray.serve.ray_logs import unprefix_engine_lines

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    monkeypatch.setattr(dispatcher, "handlers", [])
    dispatcher.add_handler(
        "ray_print_logs", functools.partial(ray_worker.print_to_stdstream, ignore_prefix=False)
    )
    unprefix_engine_lines()
    unprefix_engine_lines()  # once only
    replica = {"pid": 3508, "ip": "192.0.2.2", "is_err": False, "actor_name": "ServeReplica:llmray:LLMServer"}
    dispatcher.emit({**replica, "lines": ["[engine core 4423] loading the model (6.6s)", "a user print"]})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[engine core 4423] loading the model (6.6s)", out
    assert (
        len(out) == 2
        and "ServeReplica:llmray:LLMServer pid=3508" in out[1]
        and out[1].endswith("a user print")
    )


def test_ctrl_c_while_deploying_shuts_serve_down_cleanly(tmp_path, monkeypatch, capsys):
    """With adapters a replica can answer before `serve.run` returns; a Ctrl-C then ended `llmray serve` as
    "interrupted", exit 130, without Serve's shutdown. Now it stops like a Ctrl-C while serving (exit 0)."""
    import argparse

    import ray
    from ray import serve

    import llmray.serve.app as app_module
    import llmray.serve.cli as serve_cli

    monkeypatch.setenv("LLMRAY_VERBOSE", "1")  # no log-file routing: nothing of Ray's is touched
    monkeypatch.setattr(serve_cli, "start_ray", lambda kwargs, say=None: None)
    monkeypatch.setattr(ray, "nodes", lambda: [])
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.setattr(app_module, "build_app", lambda args: object())
    stopped = []
    monkeypatch.setattr(serve, "start", lambda **kw: None)

    def deploying(*a, **kw):
        raise KeyboardInterrupt("signal 2")  # what the SIGINT handler raises in the main thread

    monkeypatch.setattr(serve, "_run", deploying)  # llmray.serve.deploy sends the deploy without its wait
    monkeypatch.setattr(serve, "shutdown", lambda: stopped.append("serve"))
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append("ray"))
    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    ns = p.parse_args(["--model", str(tmp_path)])
    assert serve_cli._run_serve(ns, None) == 0
    assert "llmray: shutting down" in capsys.readouterr().out and stopped == ["serve", "ray"]


def test_serving_is_said_when_health_answers_not_when_serve_marks_the_app_running(monkeypatch):
    """`serve.run` returned (and "serving on" printed) seconds after the replica already answered: the deploy
    now goes out without Serve's wait, and it returns at the first 200 from /health through the proxy while
    Serve still says DEPLOYING; a failed deploy raises with Serve's message."""
    import http.server
    import threading
    from types import SimpleNamespace

    import llmray.serve.deploy as deploy

    answers = iter([503, 503, 200])

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(next(answers, 404) if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    status = {"llmray": SimpleNamespace(status="DEPLOYING", message="")}
    sent = []
    monkeypatch.setattr(serve, "start", lambda http_options: sent.append(("start", http_options)))
    monkeypatch.setattr(serve, "_run", lambda app, **kw: sent.append(("run", kw)))
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications=status))
    try:
        port = server.server_address[1]
        deploy.deploy_until_serving("app", "0.0.0.0", port, poll_s=0.01)
        assert sent == [
            ("start", {"host": "0.0.0.0", "port": port}),
            ("run", {"name": "llmray", "route_prefix": "/", "_blocking": False}),
        ]
        assert next(answers, "none left") == "none left"  # it returned at the first 200
        status["llmray"] = SimpleNamespace(status="DEPLOY_FAILED", message="the replica's constructor raised")
        with pytest.raises(RuntimeError, match="failed: the replica's constructor raised"):
            deploy.deploy_until_serving("app", "127.0.0.1", port, poll_s=0.01)  # 404 until Serve says so
    finally:
        server.shutdown()
    assert deploy.health_url("::", 8000) == "http://[::1]:8000/health"
    assert deploy.health_url("10.0.0.5", 8000) == "http://10.0.0.5:8000/health"
