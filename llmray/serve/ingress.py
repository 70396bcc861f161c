"""The OpenAI HTTP front door: FastAPI routes over a backend that streams engine events.

``build_openai_app(backend, config)`` makes the FastAPI app; its backend (``llmray/serve/backends.py``) is
the ``LLMServer`` of the same replica (``ReplicaBackend``, the default: no Ray message per chunk) or a
``DeploymentHandle`` to the ``LLMServer`` deployment (``HandleBackend``, ``ingress_mode="separate"``). Each request is parsed once, here, into its pydantic model, which
travels to ``LLMServer`` as is. The order of checks per request: API key (401) → body size (413, before
parsing) → JSON and schema (400 naming the field) → model name (404) → LLMServer queue (429 +
``Retry-After``) → the first engine event (400 for prompt + max_tokens over the context window). Only then is
a status sent, so a streamed request gets real error statuses too; an error after that is an SSE
``data: {"error": ...}`` event followed by ``data: [DONE]``.

LoRA adapters (``IngressConfig.dynamic_loras``, set when the server has ``--lora`` or ``--lora-root``):
``/v1/models`` lists the registered adapters (asked of an LLMServer replica, ``parent`` = the base model);
a request naming an adapter goes through the handle with ``multiplexed_model_id=<adapter>`` so Serve
routes it to a replica that holds the adapter (any replica otherwise, which loads it on demand; an
unknown name is the replica's 404). ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and
``POST /v1/unload_lora_adapter`` ``{"lora_name"}`` (vLLM's names; API key required) run on one replica,
which checks the name and path and updates the registry all replicas share
(``llmray/serve/lora_registry.py``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmray.serve.backends import BackPressure
from llmray.serve.errors import APIError, clip, from_validation_error
from llmray.serve.limits import MAX_BODY_BYTES
from llmray.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    new_id,
    now,
    openapi_request_body,
)
from llmray.serve.render import ChoiceState, chat_chunk, completion_chunk, final_response, usage_of
from llmray.serve.request_log import RequestIdMiddleware, install_log_filter

logger = logging.getLogger("llmray.serve")


@dataclass
class IngressConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    retry_after_s: int = 1
    max_model_len: int | None = None
    health_timeout_s: float = 3.0  # /health answers 503 rather than wait for an engine replica to appear
    dynamic_loras: bool = False  # adapters (from the LLMServer registry) are served: --lora / --lora-root


class LoadLoraAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None  # vLLM sends it; unused


def _serve_error_status(exc: BaseException) -> int | None:
    """429 for a full LLMServer queue, 503 when no LLMServer replica can take requests, else None."""
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


def _replica_lost(exc: BaseException, retry_after_s: int) -> APIError:
    return APIError(
        503,
        f"the engine replica serving this request stopped ({type(exc).__name__}); retry the request",
        code="engine_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 once it passes ``limit`` bytes (checked before parsing)."""
    too_big = APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def build_openai_app(backend: Any, config: IngressConfig) -> FastAPI:
    """The FastAPI app serving /v1/models, /v1/completions, /v1/chat/completions and /health."""
    app = FastAPI(title="llmray", docs_url=None, redoc_url=None)
    app.add_middleware(RequestIdMiddleware)  # X-Request-Id echoed, and in the request's log lines
    install_log_filter()
    served = [config.served_model_name]

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail))
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        if _serve_error_status(exc) == 503:
            err = _replica_lost(exc, config.retry_after_s)
            return JSONResponse(err.body(), status_code=503, headers=err.headers)
        logger.exception("unhandled error in the ingress")
        err = APIError(500, f"internal server error ({type(exc).__name__})")
        return JSONResponse(err.body(), status_code=500)

    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        )
        if not ok:
            raise APIError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/health")
    async def health() -> Response:
        try:
            await asyncio.wait_for(backend.health(), config.health_timeout_s)
        except TimeoutError:
            raise APIError(
                503, f"no engine replica answered the health check within {config.health_timeout_s:g} s"
            ) from None
        except Exception as e:
            raise APIError(503, f"the engine is not healthy: {e}") from None
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_auth(request)
        created = now()
        cards = [ModelCard(id=config.served_model_name, created=created, max_model_len=config.max_model_len)]
        adapters = await backend.list_adapters() if config.dynamic_loras else []
        cards += [
            ModelCard(id=a["id"], created=a["created"], root=a["id"], parent=config.served_model_name)
            for a in adapters
        ]
        return ModelList(data=cards).model_dump()

    async def handle(request: Request, kind: str) -> Response:
        arrival = time.time()
        check_auth(request)
        data = await _read_json(request, config.max_body_bytes)
        model = CompletionRequest if kind == "completions" else ChatCompletionRequest
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            raise from_validation_error(e) from None
        adapter = None if req.model == config.served_model_name else req.model
        if not config.dynamic_loras and req.model not in served:  # else the LLMServer replica decides
            raise APIError(
                404,
                f"the model '{clip(req.model)}' does not exist; available: {served}",
                "model",
                "model_not_found",
            )
        routing = {"adapter": adapter} if adapter is not None else {}  # base requests: plain calls
        routing["request_id"] = request.state.request_id
        events = backend.stream(kind, req, arrival, **routing)  # parsed once, here
        try:
            first = await anext(events)
        except StopAsyncIteration:
            raise APIError(500, "the engine returned no output") from None
        except Exception as e:
            status = _serve_error_status(e)
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
        rid = new_id("cmpl" if kind == "completions" else "chatcmpl")
        if req.stream:
            return StreamingResponse(
                _sse(events, first, req, kind, rid, n_prompts, config.retry_after_s),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        states: dict[int, ChoiceState] = {}
        try:
            batch = first
            while True:
                for ev in batch:
                    if "error" in ev:
                        raise APIError.from_dict(ev)
                    states.setdefault(ev["index"], ChoiceState()).add(ev)
                batch = await anext(events, None)
                if batch is None:
                    break
        finally:
            await events.aclose()
        return JSONResponse(final_response(kind, rid, req, states, n_prompts))

    async def adapter_call(request: Request, schema: type[BaseModel], call: Any) -> JSONResponse:
        check_auth(request)
        data = await _read_json(request, config.max_body_bytes)
        try:
            body = schema.model_validate(data)
        except ValidationError as e:
            raise from_validation_error(e) from None
        result = await call(body)
        if "error" in result:
            raise APIError.from_dict(result)
        return JSONResponse(result)

    @app.post("/v1/load_lora_adapter", openapi_extra=openapi_request_body(LoadLoraAdapterRequest))
    async def load_lora_adapter(request: Request) -> Response:
        async def call(body: LoadLoraAdapterRequest) -> dict:
            return await backend.load_adapter(body.lora_name, body.lora_path)

        return await adapter_call(request, LoadLoraAdapterRequest, call)

    @app.post("/v1/unload_lora_adapter", openapi_extra=openapi_request_body(UnloadLoraAdapterRequest))
    async def unload_lora_adapter(request: Request) -> Response:
        async def call(body: UnloadLoraAdapterRequest) -> dict:
            return await backend.unload_adapter(body.lora_name)

        return await adapter_call(request, UnloadLoraAdapterRequest, call)

    @app.post("/v1/completions", openapi_extra=openapi_request_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await handle(request, "completions")

    @app.post("/v1/chat/completions", openapi_extra=openapi_request_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await handle(request, "chat")

    return app


async def _sse(
    events: AsyncGenerator[list[dict], None],
    first: list[dict],
    req: CompletionRequest | ChatCompletionRequest,
    kind: str,
    rid: str,
    n_prompts: int,
    retry_after_s: int,
) -> AsyncIterator[str]:
    """SSE lines: one chunk per event, the usage chunk when asked, an error event if one arrives, [DONE]."""
    created = now()
    states: dict[int, ChoiceState] = {}
    make = completion_chunk if kind == "completions" else chat_chunk
    try:
        batch: list[dict] | None = first
        while batch is not None:
            lines, failed = [], False
            for ev in batch:
                if "error" in ev:
                    lines.append(f"data: {json.dumps({'error': ev['error']})}\n\n")
                    failed = True
                    break
                st = states.setdefault(ev["index"], ChoiceState())
                chunk = make(rid, created, req, ev, st)
                st.add(ev)
                if chunk is not None:
                    lines.append(f"data: {json.dumps(chunk)}\n\n")
            if lines:
                yield "".join(lines)
            batch = None if failed else await anext(events, None)
        if req.include_usage() and not failed:
            obj = "text_completion" if kind == "completions" else "chat.completion.chunk"
            usage = usage_of(states, req.n, n_prompts)
            tail = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": req.model,
                "choices": [],
                "usage": usage,
            }
            yield f"data: {json.dumps(tail)}\n\n"
    except Exception as e:  # after the 200 went out: report in-band, never a stack trace
        if _serve_error_status(e) == 503:
            err = _replica_lost(e, retry_after_s)
        else:
            logger.exception("stream failed midway")
            err = APIError(500, f"the stream failed midway ({type(e).__name__})")
        yield f"data: {json.dumps(err.body())}\n\n"
    finally:
        await events.aclose()  # on a client disconnect this cancels the LLMServer call -> engine abort
    yield "data: [DONE]\n\n"
