"""The two generation routes, ``POST /v1/completions`` and ``POST /v1/chat/completions``, as plain ASGI.

``GenerationRoutes`` wraps the FastAPI app of ``llmray/serve/ingress.py`` and answers these two routes
itself; everything else (``/health``, ``/v1/models``, the LoRA routes, ``/openapi.json``, 404/405) goes on
to FastAPI. Why: at hundreds of requests per second one replica's event loop spent most of a request's
cost in FastAPI's and Starlette's layers (six middlewares, the route's dependency machinery, a
``StreamingResponse`` with an anyio task group per stream); this path does the same work once: the API key
(401), the body read against its limit (413, before parsing), JSON and the request's pydantic model (400
naming the field), the model name (404), the replica's capacity (429 + ``Retry-After``), the first engine
event (e.g. 400 for prompt + max_tokens over the context window); then SSE frames written straight to the
socket, one write per engine wake-up. A client that disconnects cancels the request's task at once (a
watcher on ``receive``), which closes the event stream and aborts the engine request. ``X-Request-Id`` is
echoed and set for the request's log lines, as ``RequestIdMiddleware`` does for the other routes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, MutableMapping
from typing import Any

from pydantic import ValidationError

from llmray.serve.backends import BackPressure
from llmray.serve.errors import APIError, clip, from_validation_error
from llmray.serve.protocol import ChatCompletionRequest, CompletionRequest, new_id, now
from llmray.serve.render import ChoiceState, ChunkEncoder, final_response, usage_of
from llmray.serve.request_log import HEADER, REQUEST_ID, request_id_from

logger = logging.getLogger("llmray.serve")
ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_DONE = b"data: [DONE]\n\n"


def serve_error_status(exc: BaseException) -> int | None:
    """429 for a full replica or LLMServer queue, 503 when no LLMServer replica can take requests, else None."""
    if isinstance(exc, BackPressure):
        return 429
    try:
        from ray.serve import exceptions as ex
    except ImportError:  # ray absent: in-process tests only
        return None
    if isinstance(exc, ex.BackPressureError):
        return 429
    if isinstance(exc, ex.DeploymentUnavailableError | ex.ReplicaUnavailableError):
        return 503
    from ray.exceptions import RayActorError

    if isinstance(exc, RayActorError):  # the replica serving the request died (crash, OOM kill, node loss)
        return 503
    return None


def replica_lost(exc: BaseException, retry_after_s: int) -> APIError:
    return APIError(
        503,
        f"the engine replica serving this request stopped ({type(exc).__name__}); retry the request",
        code="engine_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


def json_bytes(content: Any) -> bytes:
    """The bytes Starlette's ``JSONResponse`` renders."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def send_json(send: Any, status: int, content: Any, headers: dict[str, str] | None = None) -> None:
    body = json_bytes(content)
    raw = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def header(scope: MutableMapping[str, Any], name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


async def read_json(scope: MutableMapping[str, Any], receive: Any, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 once it passes ``limit`` bytes (checked before parsing)."""

    def too_big() -> APIError:
        return APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")

    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big()
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":  # the client left before sending all of its body
            raise ClientGone()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_big()
        chunks.append(chunk)
        if not msg.get("more_body", False):
            break
    try:
        data = json.loads(b"".join(chunks) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def check_auth(scope: MutableMapping[str, Any], api_key: str | None) -> None:
    if api_key is None:
        return
    value = (header(scope, b"authorization") or b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())):
        raise APIError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


class ClientGone(Exception):
    """The client disconnected before its request was read."""


class GenerationRoutes:
    """ASGI: the generation routes here, every other request to ``app`` (the FastAPI app)."""

    def __init__(self, app: Any, backend: Any, config: Any) -> None:
        self.app = app
        self.backend = backend
        self.config = config

    def __getattr__(self, name: str) -> Any:  # routes, openapi(), ... of the FastAPI app
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path, root = scope["path"], scope.get("root_path")
            if root and path.startswith(root):
                path = path[len(root) :]
            kind = ROUTES.get(path)
            if kind is not None:
                await self.serve(kind, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def serve(self, kind: str, scope: dict, receive: Any, send: Any) -> None:
        """One generation request, start to end (also FastAPI's handler for the route: ``RawRoute``)."""
        arrival = time.time()
        state = scope.setdefault("state", {})
        given = state.get("request_id")  # reached through FastAPI: its RequestIdMiddleware set the id
        rid = given or request_id_from((header(scope, HEADER) or b"").decode("latin-1"))
        state["request_id"] = rid
        token = REQUEST_ID.set(rid)
        extra = [] if given else [(HEADER, rid.encode())]
        started = False

        async def send_with_id(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
                started = True
            await send(message)

        try:
            await self._serve(kind, scope, receive, send_with_id, arrival, rid)
        except ClientGone:
            return
        except APIError as e:
            if started:
                raise
            await send_json(send_with_id, e.status, e.body(), e.headers)
        except Exception as e:
            if started:
                raise
            if serve_error_status(e) == 503:
                err = replica_lost(e, self.config.retry_after_s)
            else:
                logger.exception("unhandled error in the ingress")
                err = APIError(500, f"internal server error ({type(e).__name__})")
            await send_json(send_with_id, err.status, err.body(), err.headers)
        finally:
            REQUEST_ID.reset(token)

    async def _serve(self, kind: str, scope: dict, receive: Any, send: Any, arrival: float, rid: str) -> None:
        config = self.config
        check_auth(scope, config.api_key)
        data = await read_json(scope, receive, config.max_body_bytes)
        model = CompletionRequest if kind == "completions" else ChatCompletionRequest
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            raise from_validation_error(e) from None
        adapter = None if req.model == config.served_model_name else req.model
        if not config.dynamic_loras and adapter is not None:  # else the LLMServer replica decides
            raise APIError(
                404,
                f"the model '{clip(req.model)}' does not exist; available: {[config.served_model_name]}",
                "model",
                "model_not_found",
            )
        routing = {"adapter": adapter} if adapter is not None else {}  # base requests: plain calls
        events = self.backend.stream(kind, req, arrival, request_id=rid, **routing)  # parsed once, here
        try:
            first = await anext(events)
        except StopAsyncIteration:
            raise APIError(500, "the engine returned no output") from None
        except Exception as e:
            status = serve_error_status(e)
            if status is None:
                raise
            message = {
                429: "the server is at capacity (engine queue full); retry after a moment",
                503: "no engine replica is available right now; retry after a moment",
            }[status]
            code = "rate_limit_exceeded" if status == 429 else "engine_unavailable"
            raise APIError(
                status, message, code=code, headers={"Retry-After": str(config.retry_after_s)}
            ) from None
        if first and "error" in first[0]:
            await events.aclose()
            err = APIError.from_dict(first[0])
            if "Retry-After" in err.headers:  # the LLMServer's retryable 503: the configured wait
                err.headers["Retry-After"] = str(config.retry_after_s)
            raise err
        n_prompts = len(req.prompts()) if isinstance(req, CompletionRequest) else 1
        response_id = new_id("cmpl" if kind == "completions" else "chatcmpl")
        # the client leaving (http.disconnect) cancels this task: the event stream closes, the engine aborts
        task = asyncio.current_task()
        left = False

        def on_receive(fut: asyncio.Future) -> None:
            nonlocal left
            if not fut.cancelled() and fut.exception() is None and fut.result()["type"] == "http.disconnect":
                left = True
                assert task is not None
                task.cancel()

        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(on_receive)
        try:
            if req.stream:
                await send({"type": "http.response.start", "status": 200, "headers": list(_SSE_HEADERS)})
                frames = sse_frames(events, first, req, kind, response_id, n_prompts, config.retry_after_s)
                async for frame in frames:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                watcher.remove_done_callback(on_receive)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            body = await collect(events, first, req, kind, response_id, n_prompts)
            watcher.remove_done_callback(on_receive)
            await send_json(send, 200, body)
        except asyncio.CancelledError:
            uncancel = getattr(task, "uncancel", None)  # Task.uncancel is Python 3.11+
            if left and task is not None and (uncancel is None or uncancel() == 0):
                return  # the client is gone: nothing to answer
            raise
        finally:
            watcher.remove_done_callback(on_receive)
            watcher.cancel()
            await events.aclose()  # a no-op after a full stream; else it aborts the engine request(s)


async def collect(
    events: AsyncGenerator[list[dict], None], first: list[dict], req: Any, kind: str, rid: str, n_prompts: int
) -> dict[str, Any]:
    """The non-streamed response body."""
    states: dict[int, ChoiceState] = {}
    batch: list[dict] | None = first
    while batch is not None:
        for ev in batch:
            if "error" in ev:
                raise APIError.from_dict(ev)
            states.setdefault(ev["index"], ChoiceState()).add(ev)
        batch = await anext(events, None)
    return final_response(kind, rid, req, states, n_prompts)


async def sse_frames(
    events: AsyncGenerator[list[dict], None],
    first: list[dict],
    req: CompletionRequest | ChatCompletionRequest,
    kind: str,
    rid: str,
    n_prompts: int,
    retry_after_s: int,
) -> AsyncIterator[bytes]:
    """SSE bytes, one write per batch of events: a chunk per event, the usage chunk when asked, an error
    event if one arrives, ``[DONE]`` (joined to the last chunk)."""
    created = now()
    states: dict[int, ChoiceState] = {}
    encoder = ChunkEncoder(kind, rid, created, req)
    dumps = json.dumps
    pending: list[str] = []
    failed = False
    open_choices = req.n * n_prompts  # the batch that finishes the last one is written with [DONE]
    try:
        batch: list[dict] | None = first
        while batch is not None:
            for ev in batch:
                if "error" in ev:
                    pending.append(f"data: {dumps({'error': ev['error']})}\n\n")
                    failed = True
                    break
                st = states.get(ev["index"])
                if st is None:
                    st = states[ev["index"]] = ChoiceState()
                line = encoder.encode(ev, st)
                if line is not None:
                    pending.append(line)
                if ev["finish_reason"] is not None:
                    open_choices -= 1
            if failed:
                break
            if pending and open_choices > 0:
                yield "".join(pending).encode()
                pending = []
            batch = await anext(events, None)
        if req.include_usage() and not failed:
            obj = "text_completion" if kind == "completions" else "chat.completion.chunk"
            usage = usage_of(states, req.n, n_prompts)
            tail = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [],
                    "usage": usage}  # fmt: skip
            pending.append(f"data: {dumps(tail)}\n\n")
    except Exception as e:  # after the 200 went out: report in-band, never a stack trace
        if serve_error_status(e) == 503:
            err = replica_lost(e, retry_after_s)
        else:
            logger.exception("stream failed midway")
            err = APIError(500, f"the stream failed midway ({type(e).__name__})")
        pending.append(f"data: {dumps(err.body())}\n\n")
    yield "".join(pending).encode() + _DONE
