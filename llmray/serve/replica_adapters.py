"""The adapters one ``LLMServer`` replica's engine holds, kept in step with the shared registry
(``llmray/serve/lora_registry.py``), and the Serve model-multiplexing hook that routes adapter requests to
replicas holding the adapter."""

from __future__ import annotations

import asyncio
from typing import Any

from llmray.serve.errors import APIError, clip
from llmray.serve.lora_registry import (
    AdapterEntry,
    LoraRegistry,
    RegistryError,
    is_adapter_name,
    resolve_under,
    validate_name,
)


class ReplicaAdapters:
    """The adapters one replica's engine holds, kept in step with the registry.

    ``resolve(name)`` runs before each adapter request: a name the registry lacks is a 404 (and dropped
    from this engine if it held it: how an unload made on another replica reaches this one); a registered
    name this engine lacks, or holds in an older version, is loaded on demand. ``on_hold(name)`` (inside
    Serve: the ``serve.multiplexed`` loader) tells Serve's router that this replica holds the adapter, so
    later requests for it prefer this replica.
    """

    def __init__(
        self, engine: Any, registry: LoraRegistry, held: dict[str, int], on_hold: Any = None
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.held = dict(held)  # name -> registry version loaded into the engine
        self.on_hold = on_hold
        self._lock = asyncio.Lock()  # one engine load/unload at a time per replica

    def _not_found(self, name: str) -> APIError:
        names = sorted(self.registry.entries())
        shown = names[:20] + (["..."] if len(names) > 20 else [])
        return APIError(
            404,
            f"the model '{clip(name)}' does not exist; the base model is '{self.registry.base_name}' and the "
            f"adapters are {shown}",
            "model",
            "model_not_found",
        )

    async def resolve(self, name: str) -> str:
        """Make sure this engine serves the registered adapter ``name`` (APIError 404 / 400 otherwise)."""
        entry = self.registry.get(name) if is_adapter_name(name) else None
        if entry is None:
            if name in self.held:
                async with self._lock:
                    await self._drop(name)
            raise self._not_found(name)
        if self.held.get(name) != entry.version:
            async with self._lock:
                if self.held.get(name) != entry.version:
                    try:
                        await self.engine.add_lora(name, entry.path)
                    except ValueError as e:  # AdapterError: the directory changed since it was registered
                        raise APIError(400, str(e), "model", "invalid_adapter") from None
                    self.held[name] = entry.version
        if self.on_hold is not None:
            await self.on_hold(name)
        return name

    async def load(self, name: str, lora_path: str) -> AdapterEntry:
        """Validate, load into this engine, then register (so a bad directory never enters the registry)."""
        try:
            validate_name(name, self.registry.base_name)
        except RegistryError as e:
            raise APIError(400, str(e), "lora_name", "invalid_value") from None
        if self.registry.root is None:
            raise APIError(
                400,
                "loading adapters at runtime is disabled: start the server with --lora-root DIR and put "
                "adapters under it",
                "lora_path",
                "lora_root_not_configured",
            )
        try:
            target = await asyncio.to_thread(resolve_under, self.registry.root, lora_path)
        except RegistryError as e:
            raise APIError(400, str(e), "lora_path", "invalid_value") from None
        async with self._lock:
            try:
                await self.engine.add_lora(name, str(target))
            except ValueError as e:  # AdapterError names what is wrong with the directory
                raise APIError(400, str(e), "lora_path", "invalid_adapter") from None
            entry = await asyncio.to_thread(self.registry.register, name, target)
            self.held[name] = entry.version
        if self.on_hold is not None:
            await self.on_hold(name)
        return entry

    async def unload(self, name: str) -> None:
        """Remove ``name`` from the registry and from this engine (running requests on it still finish)."""
        if self.registry.root is None:
            raise APIError(
                400,
                "unloading adapters at runtime is disabled: start the server with --lora-root DIR",
                "lora_name",
                "lora_root_not_configured",
            )
        removed = is_adapter_name(name) and await asyncio.to_thread(self.registry.unregister, name)
        async with self._lock:
            held = await self._drop(name)
        if not removed and not held:
            raise self._not_found(name)

    async def _drop(self, name: str) -> bool:
        if self.held.pop(name, None) is None:
            return False
        await self.engine.remove_lora(name)
        return True

    def cards(self) -> list[dict[str, Any]]:
        """``{"id", "created"}`` of each registered adapter, by name."""
        return [{"id": e.name, "created": e.created} for _, e in sorted(self.registry.entries().items())]


def multiplexed_hook(max_adapters: int) -> Any:
    """Inside a Serve replica: an async ``serve.multiplexed`` loader whose only job is to record the
    adapters this replica holds, which Serve reports to the router so requests sent with
    ``multiplexed_model_id=name`` prefer replicas that hold ``name``. (The engine owns the weights and its
    own LRU; an id the router forgets costs a routing preference, never an adapter.) None outside Serve."""
    try:
        from ray import serve
        from ray.serve.exceptions import RayServeException
    except ImportError:  # no Ray: in-process tests and tools
        return None
    try:
        serve.get_replica_context()
    except RayServeException:
        return None

    async def hold(name: str) -> str:
        return name

    return serve.multiplexed(max_num_models_per_replica=max(1, max_adapters))(hold)
