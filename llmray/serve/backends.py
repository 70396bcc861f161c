"""What the ingress streams from: an ``LLMServer`` in this process, or one behind a Serve handle.

``ReplicaBackend`` (the default deployment: the FastAPI app runs inside each ``LLMServer`` replica) calls the
server directly: a token's text goes from the engine core's pipe to the HTTP socket without a Ray message.
``HandleBackend`` (``ingress_mode="separate"``: an ``OpenAIIngress`` deployment in front) streams through a
``DeploymentHandle``: two Ray hops per chunk (proxy -> ingress -> LLMServer), measured in docs/serving.md.
A request whose replica dies before it produced anything is sent again (Serve routes it to a live or new
replica); once output went out, the ingress reports the cut in-band (503 ``engine_unavailable``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

from llmray.serve.events import Event
from llmray.serve.lora_registry import is_adapter_name

logger = logging.getLogger("llmray.serve")
REPLICA_LOST_RETRIES = 2  # a request that got no output yet is sent again when its replica died
RETRY_AFTER_S = 0.5  # times the attempt number


def _replica_died(exc: BaseException) -> bool:
    try:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import ReplicaUnavailableError
    except ImportError:
        return False
    return isinstance(exc, RayActorError | ReplicaUnavailableError)


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

    async def max_model_len(self) -> int:
        return int(self.server.max_model_len)

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
        handle = self._for(self.stream_handle, adapter)
        for attempt in range(REPLICA_LOST_RETRIES + 1):
            gen = handle.stream.remote(kind, body, arrival_s, request_id)
            started = finished = False
            try:
                async for item in gen:
                    started = True
                    yield item
                finished = True
                return
            except Exception as e:
                # the replica died before the request produced anything: nothing reached the client, so
                # it runs again on a replica Serve starts or has (the router waits for one)
                if started or attempt == REPLICA_LOST_RETRIES or not _replica_died(e):
                    raise
                logger.warning("the engine replica died before the request started; sending it again")
                await asyncio.sleep(RETRY_AFTER_S * (attempt + 1))  # the router learns the replica is gone
            finally:
                if not finished:
                    gen.cancel()  # propagates to the replica: its generator is cancelled, the engine aborts

    async def health(self) -> None:
        await self.handle.check_health.remote()

    async def list_adapters(self) -> list[dict]:
        return await self.handle.list_adapters.remote()

    async def max_model_len(self) -> int:
        return int((await self.handle.model_info.remote())["max_model_len"])

    async def load_adapter(self, name: str, path: str) -> dict:
        return await self._for(self.handle, name).load_adapter.remote(name, path)

    async def unload_adapter(self, name: str) -> dict:
        return await self._for(self.handle, name).unload_adapter.remote(name)
