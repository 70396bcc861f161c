"""``X-Request-Id``: taken from the client (or made here), echoed on every response, and put in front of
every log line the ingress and the engine replica write while they work on that request.

The id lives in a ``ContextVar``: the ingress's ASGI middleware sets it for the request's task (Starlette's
streaming tasks inherit it), ``LLMServer.stream`` sets it again in the replica, and a logging filter on the
``llmray.serve`` and ``llmray.engine`` loggers prefixes records with ``[request-id]``.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar
from typing import Any

from llmray.serve.limits import MAX_REQUEST_ID_CHARS
from llmray.serve.protocol import fast_id

REQUEST_ID: ContextVar[str | None] = ContextVar("llmray_request_id", default=None)
_VALID = re.compile(
    rf"[A-Za-z0-9._:/+=-]{{1,{MAX_REQUEST_ID_CHARS}}}"
)  # anything else (or nothing) gets an id of ours
HEADER = b"x-request-id"


def request_id_from(value: str | None) -> str:
    """The client's id when it is short and plain, else a fresh one (never echo arbitrary bytes)."""
    if value and _VALID.fullmatch(value):
        return value
    return fast_id()


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        record.request_id = rid or "-"
        if rid and not getattr(record, "_llmray_rid", False):
            record.msg = f"[{rid}] {record.msg}"
            record._llmray_rid = True
        return True


def install_log_filter() -> None:
    for name in ("llmray.serve", "llmray.engine"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _RequestIdFilter) for f in log.filters):
            log.addFilter(_RequestIdFilter())


class RequestIdMiddleware:
    """Pure ASGI (no per-chunk overhead on streams): sets the id, adds ``X-Request-Id`` to the response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", ()) if k == HEADER), b"")
        rid = request_id_from(given.decode("latin-1"))
        scope.setdefault("state", {})["request_id"] = rid
        token = REQUEST_ID.set(rid)

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (HEADER, rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
