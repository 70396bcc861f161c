"""``LLMServer``: the Serve deployment that owns one engine (``AsyncLLM``) per replica.

The ingress sends it the request it parsed (the pydantic model: parsed once); ``stream`` turns it into
engine requests (the chat template applied, ``n`` choices fanned out as ``n`` engine requests with seeds
``seed + i``, ``to_sampling_params`` on the model) and yields lists of ``llmray.serve.events`` events as
tokens are produced: ``TokenEvent``s, or one ``ErrorEvent`` when the request cannot run (errors travel as
data, so no exception type has to survive Ray). The engine's core runs in a process of its own; a dead
core makes every stream end with the retryable 503 ``engine_unavailable`` and ``check_health`` fail.
Streaming: the first token goes out at once; with ``stream_interval_ms`` > 0 later ones are batched per
interval (one chunk carries several tokens; consecutive events of a choice are folded into one), and with
``stream_messages_per_s`` the interval grows with the streams the replica holds (a few streams get every
token at once). In the default deployment the ingress runs in this replica and calls ``stream`` directly
(``llmray/serve/backends.py``); behind a separate ingress each yield is one Ray streaming message. When the
caller stops iterating (client disconnect, Serve cancellation), every engine request of the call is
aborted at once.

LoRA (with ``loras`` or ``lora_root``): a request whose ``model`` names an adapter is checked against the
registry shared by all replicas and the adapter is loaded into this engine on demand (404 unknown, 400 a
directory that cannot be served); ``load_adapter`` / ``unload_adapter`` / ``list_adapters`` back the
ingress's LoRA routes. Inside Serve a ``serve.multiplexed`` loader records the adapters this replica holds,
so the router sends later requests for them here (``llmray/serve/lora_registry.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from pydantic import BaseModel

from llmray.engine.errors import EngineDeadError
from llmray.serve.errors import APIError, clip, engine_unavailable, from_value_error
from llmray.serve.events import Event, TokenEvent, error_event, merge_events
from llmray.serve.lora_registry import LoraRegistry
from llmray.serve.metrics import ServeMetrics
from llmray.serve.prepare import RequestPlanner, api_param
from llmray.serve.protocol import ChatCompletionRequest, CompletionRequest, fast_id
from llmray.serve.ray_logs import write_console
from llmray.serve.replica_adapters import ReplicaAdapters, multiplexed_hook
from llmray.serve.request_log import REQUEST_ID, install_log_filter
from llmray.serve.structured_api import ChatPlan, ChoiceOutput, split_event

logger = logging.getLogger("llmray.serve")
STATS_POLL_S = 1.0  # how often engine gauges are refreshed
# with the message budget on, up to this many streams get every token at once (a few hundred messages/s);
# beyond it each stream yields at most once per max(stream interval, active streams / budget)
TOKEN_BY_TOKEN_STREAMS = 4
_DONE = object()


def _progress(text: str) -> None:
    write_console(text)  # start-up progress of the engine core: the replica's stdout reaches the driver


def load_engine(
    model_dir: str, engine_kwargs: dict[str, Any], loras: dict[str, str], engine_factory: str | None = None
):
    """The replica's engine: ``AsyncLLM`` over an engine core process, or what ``engine_factory``
    ("module:callable", called as ``f(model_dir, loras=..., **engine_kwargs)``; test doubles) builds."""
    if engine_factory:
        from llmray.engine.core import load_factory

        return load_factory(engine_factory)(model_dir, loras=dict(loras), **engine_kwargs)
    from llmray.engine.async_llm import AsyncLLM  # not llm.py: the replica never imports torch

    kwargs = dict(engine_kwargs)
    if loras:
        kwargs["loras"] = dict(loras)
    # the engine core runs in a process of its own; this replica process never touches the device
    return AsyncLLM(model_dir, on_progress=_progress, **kwargs)


class LLMServer:
    """One engine replica. Wrapped by ``serve.deployment`` in ``llmray.serve.app``."""

    def __init__(
        self,
        model_dir: str,
        served_model_name: str,
        engine_factory: str | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        loras: dict[str, str] | None = None,
        enable_metrics: bool = True,
        stream_interval_ms: float = 0.0,
        stream_messages_per_s: float = 0.0,
        lora_root: str | None = None,
        lora_seed: str | None = None,
    ) -> None:
        self.model_name = served_model_name
        # after the first token, yield at most once per interval (tokens in between travel together):
        # fewer Ray streaming messages per token, at the cost of burstier inter-token arrivals
        self.stream_interval_s = stream_interval_ms / 1000.0
        # a budget of Ray streaming messages per second for the whole replica (0 = none): with many streams
        # the interval grows to active_streams / budget, so Serve's per-message cost stays bounded
        self.stream_messages_per_s = stream_messages_per_s
        self._active = 0  # engine requests streaming from this replica
        # LoRA: the registry (shared through lora_root) names every adapter; the engine preloads the
        # startup adapters still registered and loads the others on demand (llmray/serve/lora_registry.py)
        engine_kwargs = dict(engine_kwargs or {})
        self.lora_enabled = bool(loras or lora_root)
        self.registry = LoraRegistry(lora_root, served_model_name, dict(loras or {}), seed=lora_seed)
        entries = self.registry.entries()
        preload = {n: e.path for n, e in entries.items() if n in (loras or {})}
        if self.lora_enabled:
            engine_kwargs.setdefault("enable_lora", True)  # adapters may be loaded later
        self.engine = load_engine(model_dir, engine_kwargs, preload, engine_factory)
        hook = multiplexed_hook(int(engine_kwargs.get("max_cpu_loras", 16))) if self.lora_enabled else None
        held = {n: entries[n].version for n in preload}
        self.adapters = ReplicaAdapters(self.engine, self.registry, held, on_hold=hook)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = int(self.engine.max_model_len)
        self.planner = RequestPlanner(self.tokenizer, self.max_model_len)
        self.metrics = ServeMetrics(served_model_name, enabled=enable_metrics)
        self._poll_task: asyncio.Task | None = None
        install_log_filter()

    # --- Serve hooks ------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy (it gets replaced)."""
        if not self.engine.is_alive():
            raise RuntimeError("the engine loop is not running (its core process stopped)")

    def stats(self) -> dict[str, Any]:
        return dict(self.engine.stats())

    def model_info(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "max_model_len": self.max_model_len,
            "loras": self.adapter_names(),  # registered (all replicas)
            "loras_held": sorted(self.adapters.held),  # loaded into this replica's engine
        }

    # --- LoRA adapters (called by the ingress; errors travel as {"error", "status"} data) -----------
    def adapter_names(self) -> list[str]:
        return sorted(self.registry.entries())

    def list_adapters(self) -> list[dict[str, Any]]:
        """``{"id", "created"}`` per registered adapter (the ingress makes /v1/models cards of them)."""
        return self.adapters.cards()

    async def load_adapter(self, lora_name: str, lora_path: str) -> dict[str, Any]:
        """Load and register an adapter from under lora_root (``POST /v1/load_lora_adapter``)."""
        try:
            entry = await self.adapters.load(lora_name, lora_path)
        except APIError as e:
            return e.to_dict()
        return {"lora_name": entry.name, "lora_path": entry.path, "version": entry.version}

    async def unload_adapter(self, lora_name: str) -> dict[str, Any]:
        """Unregister an adapter and drop it here; other replicas drop it at their next request for it."""
        try:
            await self.adapters.unload(lora_name)
        except APIError as e:
            return e.to_dict()
        return {"lora_name": lora_name, "unloaded": True}

    def __del__(self) -> None:
        """Serve calls this after draining the replica's requests (graceful shutdown, scale-down)."""
        shutdown = getattr(getattr(self, "engine", None), "shutdown", None)
        if shutdown is not None:
            shutdown()

    async def _poll_stats(self) -> None:
        while True:
            try:
                self.metrics.update_from_stats(self.engine.stats())
            except Exception:  # a metrics hiccup must not stop serving; it is logged, and retried next poll
                logger.exception("refreshing engine metrics failed")
            await asyncio.sleep(STATS_POLL_S)

    async def _lora(self, model: str) -> str | None:
        if model == self.model_name:
            return None
        if self.lora_enabled:
            return await self.adapters.resolve(model)  # 404 unknown / loaded on demand
        raise APIError(
            404,
            f"the model '{clip(model)}' does not exist; this server has {self.model_name!r}",
            "model",
            "model_not_found",
        )

    # --- the streaming entry point ----------------------------------------------------------------
    async def stream(
        self,
        kind: str,
        body: CompletionRequest | ChatCompletionRequest | dict[str, Any],
        arrival_s: float | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[list[Event], None]:
        """Run one OpenAI request; yields lists of events (see the module docstring). ``request_id`` (the
        client's X-Request-Id) prefixes this replica's log lines for the request."""
        REQUEST_ID.set(request_id)
        start = time.time()
        if self._poll_task is None and self.metrics.enabled:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_stats())
        try:
            req = body if isinstance(body, BaseModel) else self.planner.parse(kind, body)  # ingress parsed it
            lora = await self._lora(req.model)
            if arrival_s is not None:
                self.metrics.observe_queue(start - arrival_s, lora)  # under the adapter's name, if one
            jobs, plan = self.planner.jobs(req)
        except APIError as e:
            yield [error_event(e)]
            return
        base_id = fast_id()
        if len(jobs) == 1:  # the common case: one engine request, its events passed straight through
            idx, ids, sp = jobs[0]
            async with aclosing(self._events(f"{base_id}-{idx}", idx, ids, sp, lora, start, plan)) as events:
                async for ev in events:
                    yield [ev]
            return
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._pump(queue, f"{base_id}-{idx}", idx, ids, sp, lora, start, plan))
            for idx, ids, sp in jobs
        ]
        try:
            active = len(tasks)
            while active:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                ready: list[Event] = []
                for item in batch:
                    if item is _DONE:
                        active -= 1
                    else:
                        ready.append(item)
                if ready:
                    yield merge_events(ready)
                    if any("error" in ev for ev in ready):
                        return
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()  # closes its engine stream, which aborts the request in the core

    async def _pump(
        self,
        queue: asyncio.Queue,
        rid: str,
        index: int,
        ids: list[int],
        sp: Any,
        lora: str | None,
        start: float,
        plan: ChatPlan | None = None,
    ) -> None:
        """Feed one engine request's events into ``queue`` (``n`` > 1 or several prompts); ``_DONE`` at the end."""
        try:
            async with aclosing(self._events(rid, index, ids, sp, lora, start, plan)) as events:
                async for ev in events:
                    queue.put_nowait(ev)
        finally:
            queue.put_nowait(_DONE)

    def _interval(self) -> float:
        """This moment's stream interval: the configured one, longer when many streams share the replica."""
        if self.stream_interval_s <= 0 or self.stream_messages_per_s <= 0:
            return self.stream_interval_s
        load = self._active / self.stream_messages_per_s  # the budget shared by the active streams
        if self._active <= TOKEN_BY_TOKEN_STREAMS:  # a quiet replica streams every token as it comes
            return load
        return max(self.stream_interval_s, load)

    async def _events(
        self,
        rid: str,
        index: int,
        ids: list[int],
        sp: Any,
        lora: str | None,
        start: float,
        plan: ChatPlan | None,
    ) -> AsyncGenerator[Event, None]:
        """One engine request as events (at most one per stream interval after the first token); an error
        ends it as an ``{"error", "status"}`` event. Closing it aborts the request in the engine."""
        first = None  # when the first token arrived
        split = ChoiceOutput(plan) if plan is not None else None  # content / reasoning / tool calls
        self._active += 1
        try:
            stream = self.engine.generate_stream(
                ids, sp, request_id=rid, lora=lora, interval_s=self._interval
            )
            completion = 0
            async with aclosing(stream) as outputs:
                async for out in outputs:
                    new_ids = out.new_token_ids
                    if first is None:
                        first = time.time()
                    completion = len(out.token_ids)
                    ev: TokenEvent = {
                        "index": index,
                        "text": out.new_text,
                        "num_tokens": len(new_ids),
                        "finish_reason": out.finish_reason,
                        "prompt_tokens": len(out.prompt_token_ids),
                        "completion_tokens": completion,
                        "logprobs": None,
                    }
                    if sp.logprobs is not None and out.logprobs is not None and new_ids:
                        ev["logprobs"] = [
                            self._logprob_entry(t, lp, sp.logprobs)
                            for t, lp in zip(new_ids, out.logprobs[-len(new_ids) :])
                        ]
                    if split is not None:
                        split_event(ev, split)
                    yield ev
            # per request, not per chunk: a Ray metric observation costs ~0.1 ms of this replica's loop
            self.metrics.observe_request(start, first, time.time(), completion, lora)
        except EngineDeadError as e:
            yield error_event(engine_unavailable(f"the engine stopped ({e}); retry the request"))
        except ValueError as e:
            if (
                lora is not None and getattr(e, "param", None) == "model"
            ):  # the adapter was unloaded meanwhile
                yield error_event(APIError(404, str(e), "model", "model_not_found"))
            else:
                yield error_event(api_param(from_value_error(e), plan))
        except Exception as e:
            msg = f"the engine failed on this request ({type(e).__name__}: {e})"
            yield error_event(APIError(500, msg))
        finally:
            self._active -= 1

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprob_entry(self, token_id: int, lps: dict[int, float], k: int) -> dict[str, Any]:
        top = sorted(lps.items(), key=lambda kv: -kv[1])[:k]
        return {
            "token": self._token_str(token_id),
            "logprob": float(lps.get(token_id, -9999.0)),  # JSON has no -inf
            "top": [[self._token_str(t), float(v)] for t, v in top],
        }
