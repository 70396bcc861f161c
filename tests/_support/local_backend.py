"""The ingress's backend over an in-process ``LLMServer`` (fast tests; no Ray). In Serve it is
``llmray.serve.ingress.HandleBackend`` over a ``DeploymentHandle``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

MOCK_ENGINE = "_support.mock_engine:MockAsyncLLM"  # LLMServer(engine_factory=MOCK_ENGINE): no model


class LocalBackend:
    def __init__(self, server: Any) -> None:
        self.server = server

    async def stream(
        self,
        kind: str,
        body: Any,
        arrival_s: float,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[list[dict]]:
        async for item in self.server.stream(kind, body, arrival_s, request_id):
            yield item

    async def health(self) -> None:
        self.server.check_health()

    async def list_adapters(self) -> list[dict]:
        return self.server.list_adapters()

    async def load_adapter(self, name: str, path: str) -> dict:
        return await self.server.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> dict:
        return await self.server.unload_adapter(name)
