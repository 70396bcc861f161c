"""What the ingress streams from: an ``LLMServer`` in this process, or one behind a Serve handle.

``ReplicaBackend`` (the default deployment: the FastAPI app runs inside each ``LLMServer`` replica) calls the
server directly: a token's text goes from the engine core's pipe to the HTTP socket without a Ray message.
``HandleBackend`` (``ingress_mode="separate"``: an ``OpenAIIngress`` deployment in front) streams through a
``DeploymentHandle``: two Ray hops per chunk (proxy -> ingress -> LLMServer), measured in docs/serving.md.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from llmray.serve.events import Event
from llmray.serve.lora_registry import is_adapter_name


class BackPressure(Exception):
    """The replica holds as many requests as it admits (the ingress answers 429 + Retry-After)."""


class ReplicaBackend:
    """The ingress inside an ``LLMServer`` replica: requests run on ``server`` in this process.

    ``max_requests`` bounds the requests the replica holds (running in the engine + waiting in its queue):
    beyond it a request is refused with 429, as Serve's ``max_queued_requests`` does for a handle call.
    """

    def __init__(self, server: Any, max_requests: int | None = None) -> None:
        self.server = server
        self.max_requests = max_requests
        self.ongoing = 0

    async def stream(
        self,
        kind: str,
        body: Any,
        arrival_s: float,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[list[Event], None]:
        if self.max_requests is not None and self.ongoing >= self.max_requests:
            raise BackPressure(f"{self.ongoing} requests held (limit {self.max_requests})")
        self.ongoing += 1
        try:
            async for item in self.server.stream(kind, body, arrival_s, request_id):
                yield item
        finally:
            self.ongoing -= 1

    async def health(self) -> None:
        self.server.check_health()

    async def list_adapters(self) -> list[dict]:
        return self.server.list_adapters()

    async def load_adapter(self, name: str, path: str) -> dict:
        return await self.server.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> dict:
        return await self.server.unload_adapter(name)


class HandleBackend:
    """Streams from the ``LLMServer`` deployment through a Serve ``DeploymentHandle``."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.stream_handle = handle.options(stream=True)

    def _for(self, handle: Any, adapter: str | None) -> Any:
        """``handle`` routed by Serve model multiplexing when the request names an adapter."""
        if adapter is None or not is_adapter_name(adapter):
            return handle
        return handle.options(multiplexed_model_id=adapter)

    async def stream(
        self,
        kind: str,
        body: Any,
        arrival_s: float,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[list[Event], None]:
        gen = self._for(self.stream_handle, adapter).stream.remote(kind, body, arrival_s, request_id)
        finished = False
        try:
            async for item in gen:
                yield item
            finished = True
        finally:
            if not finished:
                gen.cancel()  # propagates to the replica: its generator is cancelled and aborts the engine

    async def health(self) -> None:
        await self.handle.check_health.remote()

    async def list_adapters(self) -> list[dict]:
        return await self.handle.list_adapters.remote()

    async def load_adapter(self, name: str, path: str) -> dict:
        return await self._for(self.handle, name).load_adapter.remote(name, path)

    async def unload_adapter(self, name: str) -> dict:
        return await self._for(self.handle, name).unload_adapter.remote(name)
