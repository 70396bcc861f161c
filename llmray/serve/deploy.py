"""Deploying the OpenAI app and saying when it serves: as soon as ``/health`` answers through Serve's HTTP
proxy, not when ``serve.run`` returns.

``serve.run`` returns once Serve's controller has marked the application RUNNING and the client has seen
it (it polls once a second); on a busy machine that came seconds after the replica already answered
requests, so ``llmray serve`` printed "serving on" late (and the demo waited for it). Here the deploy is
sent without that wait, and the caller goes on at the first of: ``GET /health`` answers 200 (the request
went through the proxy to a replica whose engine is up), or Serve reports the application RUNNING. A
failed deploy raises, as ``serve.run`` does.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from typing import Any

APP_NAME = "llmray"


def health_url(host: str, port: int) -> str:
    """Where this machine reaches the server bound to ``host``: a wildcard bind answers on loopback."""
    connect = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    if ":" in connect:  # an IPv6 address
        connect = f"[{connect}]"
    return f"http://{connect}:{port}/health"


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``GET url`` answers 200 within ``timeout_s`` (not yet routed, 503, refused: False)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except (OSError, http.client.HTTPException, ValueError):  # URLError/HTTPError are OSErrors
        return False


def app_status(name: str) -> tuple[str, str]:
    """(status, message) of the Serve application ``name`` ("" while Serve does not list it yet)."""
    from ray import serve

    app = serve.status().applications.get(name)
    return (str(getattr(app.status, "value", app.status)), app.message) if app is not None else ("", "")


def deploy_until_serving(app: Any, host: str, port: int, name: str = APP_NAME, poll_s: float = 0.25) -> None:
    """``serve.start`` + the deploy of ``app`` under ``name`` at route ``/``; returns when it serves (see the
    module docstring). Raises RuntimeError when Serve reports the deploy failed."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve._run(app, name=name, route_prefix="/", _blocking=False)  # returns once the deployments exist
    url = health_url(host, port)
    while True:
        if answers(url):
            return
        status, message = app_status(name)
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"Deploying application {name} failed: {message}")
        time.sleep(poll_s)
