"""The OpenAI HTTP front door: FastAPI routes over a backend that streams engine events.

``build_openai_app(backend, config)`` makes the app (``GenerationRoutes`` answering the two generation routes
in front of the FastAPI app; ``llmray/serve/generate.py``); its backend (``llmray/serve/backends.py``) is
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
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmray.serve.errors import APIError, from_validation_error
from llmray.serve.generate import (
    GenerationRoutes,
    check_auth,
    read_json,
    replica_lost,
    serve_error_status,
)
from llmray.serve.limits import MAX_BODY_BYTES
from llmray.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    now,
    openapi_request_body,
)
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


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 once it passes ``limit`` bytes (checked before parsing)."""
    return await read_json(request.scope, request.receive, limit)


class _Generation(Response):
    """A generation route reached through FastAPI (``GenerationRoutes`` normally answers it first)."""

    def __init__(self, routes: GenerationRoutes, kind: str) -> None:
        self.routes, self.kind, self.background = routes, kind, None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.routes.serve(self.kind, scope, receive, send)


def build_openai_app(backend: Any, config: IngressConfig) -> GenerationRoutes:
    """The ASGI app serving /v1/models, /v1/completions, /v1/chat/completions and /health: the generation
    routes answered by ``GenerationRoutes`` (``llmray/serve/generate.py``) in front of the FastAPI app
    (which declares them too, for /openapi.json, and serves everything else)."""
    app = FastAPI(title="llmray", docs_url=None, redoc_url=None)
    app.add_middleware(RequestIdMiddleware)  # X-Request-Id echoed, and in the request's log lines
    install_log_filter()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail))
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        if serve_error_status(exc) == 503:
            err = replica_lost(exc, config.retry_after_s)
            return JSONResponse(err.body(), status_code=503, headers=err.headers)
        logger.exception("unhandled error in the ingress")
        err = APIError(500, f"internal server error ({type(exc).__name__})")
        return JSONResponse(err.body(), status_code=500)

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
        check_auth(request.scope, config.api_key)
        created = now()
        if config.max_model_len is None:  # not set at deploy time: the engine's own (the model's default)
            config.max_model_len = await backend.max_model_len()
        cards = [ModelCard(id=config.served_model_name, created=created, max_model_len=config.max_model_len)]
        adapters = await backend.list_adapters() if config.dynamic_loras else []
        cards += [
            ModelCard(
                id=a["id"],
                created=a["created"],
                root=a["id"],
                parent=config.served_model_name,
                max_model_len=config.max_model_len,
            )  # an adapter runs in the base model's engine
            for a in adapters
        ]
        return ModelList(data=cards).model_dump()

    async def adapter_call(request: Request, schema: type[BaseModel], call: Any) -> JSONResponse:
        check_auth(request.scope, config.api_key)
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

    routes = GenerationRoutes(app, backend, config)

    @app.post("/v1/completions", openapi_extra=openapi_request_body(CompletionRequest))
    async def completions() -> Response:
        return _Generation(routes, "completions")

    @app.post("/v1/chat/completions", openapi_extra=openapi_request_body(ChatCompletionRequest))
    async def chat_completions() -> Response:
        return _Generation(routes, "chat")

    return routes
