"""User-facing engine: ``LLM`` (offline batches) and ``AsyncLLM`` (streaming, for the server).

``LLM(model_dir, **engine_kwargs).generate(prompts, SamplingParams(...))`` loads a Hugging Face Qwen3
directory; ``LLM.from_model(model, tokenizer, **engine_kwargs)`` wraps an in-memory model (tests, benches).
``AsyncLLM`` runs the engine loop in a background thread; each request streams through an asyncio queue,
and a consumer that stops iterating aborts its request (its KV blocks are freed at once).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from llmray.engine.engine import LLMEngine, make_engine_config, resolve_device_dtype
from llmray.engine.outputs import RequestOutput
from llmray.engine.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "RequestOutput", "SamplingParams", "build_engine"]
logger = logging.getLogger("llmray.engine")
_END = object()  # generate_stream: the request iterable is exhausted


def build_engine(
    model_dir: str | Path | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Any | None = None,
    loras: dict[str, str | Path] | None = None,
    **engine_kwargs: Any,
) -> LLMEngine:
    """An ``LLMEngine`` from a model directory, or from an in-memory model (moved to the engine's device/dtype).

    ``loras`` = {name: PEFT adapter directory} served next to the base model (implies ``enable_lora``).
    """
    config = make_engine_config(**engine_kwargs)
    device, dtype = resolve_device_dtype(config)
    if model is None:
        if model_dir is None:
            raise ValueError("pass a model directory or an in-memory model")
        from llmray.model.checkpoint import load_model
        from llmray.model.tokenizer import Tokenizer

        model = load_model(model_dir, device=device, dtype=dtype, kernels=config.kernels)
        tokenizer = Tokenizer.load(model_dir)
    else:
        model = model.to(device=device, dtype=dtype).eval()
        model.set_kernels(config.kernels)
    return LLMEngine(model, tokenizer, config, {k: str(v) for k, v in (loras or {}).items()})


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _prompt_list(prompts: str | list[int] | Sequence[str | list[int]]) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt of token ids
    return prompts


class _EngineFront:
    """What ``LLM`` and ``AsyncLLM`` share: construction from an in-memory model and engine accessors."""

    engine: LLMEngine

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any | None = None, **engine_kwargs: Any):
        return cls(_engine=build_engine(model=model, tokenizer=tokenizer, **engine_kwargs))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def list_loras(self) -> list[str]:
        """Names of the LoRA adapters served next to the base model."""
        return self.engine.list_loras()


class LLM(_EngineFront):
    """Offline generation: every prompt is batched by the scheduler; returns outputs in prompt order."""

    def __init__(
        self, model_dir: str | Path | None = None, *, _engine: LLMEngine | None = None, **engine_kwargs: Any
    ):
        self.engine = _engine if _engine is not None else build_engine(model_dir, **engine_kwargs)
        self.engine.stream_outputs = False
        self._counter = 0

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def add_lora(self, name: str, path: str | Path) -> None:
        """Serve the PEFT adapter in ``path`` as ``name`` (AdapterError, a ValueError, if it cannot be)."""
        self.engine.add_lora(name, str(path))

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (a string or a list of token ids); ``sampling_params`` one or one per prompt."""
        plist = _prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(plist)
        else:
            params = list(sampling_params)
        loras = [lora] * len(plist) if lora is None or isinstance(lora, str) else list(lora)
        if len(params) != len(plist) or len(loras) != len(plist):
            raise ValueError(
                f"got {len(plist)} prompts but {len(params)} sampling params and {len(loras)} lora names"
            )
        ids = []
        for prompt, p, name in zip(plist, params, loras, strict=True):
            rid = f"llm-{self._counter}"
            self._counter += 1
            self.engine.add_request(rid, prompt, p, name)
            ids.append(rid)
        final: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return [final[r] for r in ids]

    def generate_stream(
        self,
        requests: Iterable[tuple],
        sampling_params: SamplingParams | None = None,
        lora: str | None = None,
        *,
        max_in_flight: int | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield each request's final output as soon as it finishes (completion order, not input order).

        ``requests``: an iterable (consumed lazily) of ``(request_id, prompt)``, ``(request_id, prompt,
        params)`` or ``(request_id, prompt, params, lora)``; ``prompt`` is a string or token ids, a missing or
        None ``params``/``lora`` takes ``sampling_params``/``lora``. A live feed may yield None for "nothing
        new yet": the stream steps the running requests and asks again (such a feed should block while
        nothing runs, ``self.engine.has_unfinished()`` False). New requests are added as others finish,
        at most ``max_in_flight`` at once (default: twice the engine's ``max_num_seqs``), so the continuous
        batch stays full and nothing waits for the slowest request. Yielded outputs carry the caller's
        request id. A request the engine refuses raises ValueError (validate first to skip bad ones);
        closing the generator early aborts the requests still running.
        """
        limit = max_in_flight or 2 * self.engine.config.max_num_seqs
        if limit < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {limit}")
        source = iter(requests)
        running: dict[str, str] = {}  # engine id -> caller id
        exhausted = False
        try:
            while True:
                while not exhausted and len(running) < limit:
                    item = next(source, _END)
                    if item is _END:
                        exhausted = True
                        break
                    if item is None:  # a live feed has nothing new right now
                        break
                    caller_id, prompt, *rest = item
                    params = (rest[0] if rest else None) or sampling_params or SamplingParams()
                    name = rest[1] if len(rest) > 1 and rest[1] is not None else lora
                    rid = f"stream-{self._counter}"
                    self._counter += 1
                    self.engine.add_request(rid, prompt, params, name)
                    running[rid] = caller_id
                if not running and exhausted:
                    while self.engine.has_unfinished():  # drain a step launched ahead (async scheduling)
                        self.engine.step()
                    return
                for out in self.engine.step():
                    if out.finished and out.request_id in running:
                        out.request_id = running.pop(out.request_id)
                        yield out
        finally:
            for rid in running:
                self.engine.abort(rid)


class AsyncLLM(_EngineFront):
    """Engine loop in a background thread; ``generate_stream`` yields ``RequestOutput``s as tokens arrive."""

    def __init__(
        self, model_dir: str | Path | None = None, *, _engine: LLMEngine | None = None, **engine_kwargs: Any
    ):
        self.engine = _engine if _engine is not None else build_engine(model_dir, **engine_kwargs)
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._failures = 0  # consecutive failed steps
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llmray-engine", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    # --- engine thread ------------------------------------------------------------------------
    def _push(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _handle(self, command: tuple) -> None:
        kind, request_id, *args = command
        if kind == "add":
            try:
                self.engine.add_request(request_id, *args)
            except ValueError as e:  # validated already; a race (e.g. duplicate id) still reaches the caller
                self._push(request_id, e)
        elif kind == "abort":
            out = self.engine.abort(request_id)
            if out is not None:
                self._push(request_id, out)
        elif kind == "call":  # run fn on the engine thread, hand its result or error to the caller's future
            loop, future, fn = args
            try:
                result, error = fn(), None
            except Exception as e:
                result, error = None, e
            loop.call_soon_threadsafe(_settle, future, result, error)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                try:
                    if self.engine.has_unfinished():
                        command = self._commands.get_nowait()
                    else:
                        command = self._commands.get(timeout=0.05)  # idle: wait for work
                    self._handle(command)
                    while True:
                        self._handle(self._commands.get_nowait())
                except queue.Empty:
                    pass
                if self.engine.has_unfinished():
                    try:
                        outputs = self.engine.step()
                    except Exception as e:
                        self._fail_running(e)  # raises again if the engine cannot recover
                        continue
                    self._failures = 0
                    for out in outputs:
                        self._push(out.request_id, out)
        except BaseException as e:  # the loop is dead: every waiting request gets the error
            self._error = e
            with self._lock:
                streams = list(self._streams)
            for request_id in streams:
                self._push(request_id, e)

    def _fail_running(self, error: Exception) -> None:
        """A step raised: fail the requests it held (each stream gets the error), then keep serving.

        A second failure in a row (e.g. a broken device) re-raises and ends the loop.
        """
        self._failures += 1
        logger.exception("engine step failed; aborting %d request(s)", len(self.engine.requests))
        if self._failures > 1:
            raise error
        for request_id in self.engine.abort_all():
            self._push(request_id, RuntimeError(f"the engine step failed: {error!r}"))

    # --- public API ---------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the engine loop died: {self._error!r}") from self._error
        if not self._thread.is_alive():
            raise RuntimeError("the engine loop is not running (shut down)")

    async def generate_stream(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's state after each new token; the last output has ``finish_reason`` set."""
        self._check_alive()
        params = sampling_params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        ids = self.engine.encode(prompt)
        self.engine.validate(ids, params, lora)  # bad requests fail here, in the caller, as ValueError
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", request_id, ids, params, lora))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, ValueError):
                    raise item
                if isinstance(item, RuntimeError):
                    raise item  # this request's step failed, or the loop died
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine loop died: {item!r}") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def _on_engine_thread(self, fn: Any) -> Any:
        self._check_alive()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(("call", None, loop, future, fn))
        return await future

    async def add_lora(self, name: str, path: str | Path) -> None:
        """Serve the PEFT adapter in ``path`` as ``name``; replaces an adapter of that name (requests running
        on the old one finish on it). AdapterError (a ValueError) names what is wrong with the directory."""
        if self.engine.lora is None:
            raise ValueError("this engine was started without LoRA support (enable_lora=True)")
        adapter = await asyncio.to_thread(self.engine.lora.load, name, str(path))  # disk I/O off the loop
        await self._on_engine_thread(lambda: self.engine.add_lora(name, adapter))

    async def remove_lora(self, name: str) -> None:
        """Stop serving ``name`` (KeyError if unknown); requests already accepted for it still complete."""
        await self._on_engine_thread(lambda: self.engine.remove_lora(name))

    def shutdown(self) -> None:
        self._stopping = True
        self._thread.join(timeout=30)
