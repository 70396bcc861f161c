"""``AsyncLLM``: the streaming front-end of an engine core (``llmray.engine.core``).

The core runs the step loop in its own process (``engine_core="process"``, the default for a model
directory) or in a thread (an in-memory model, tests). Each step it sends one message with every running
request's new token; a reader thread files the tokens under their requests and wakes only the consumers
that wait (one ``call_soon_threadsafe`` per event loop per step, not one per request). The consumer
(``generate_stream``) detokenizes what arrived since its last yield in one go, applies stop strings (a
request that hits one is aborted in the core) and yields one ``RequestOutput`` per wake-up; with
``interval_s`` it yields at most once per interval after the first token, and at once when the request
finishes. A consumer that stops iterating aborts its request: the core frees its KV blocks at once.
A dead core fails every stream with ``EngineDeadError`` (the server's retryable 503).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from llmray.engine.core_client import ProcessCore, ThreadCore
from llmray.engine.detokenizer import IncrementalDetokenizer
from llmray.engine.errors import EngineDeadError, RequestError
from llmray.engine.outputs import RequestOutput
from llmray.engine.sampling_params import SamplingParams
from llmray.lora.errors import AdapterError

logger = logging.getLogger("llmray.engine")


class _Stream:
    """One request's state in the front-end; ``pending`` is filled by the reader thread under the lock."""

    __slots__ = (
        "rid", "request_id", "loop", "prompt_ids", "params", "detok", "token_ids", "logprobs", "pending",
        "pending_lps", "finish_reason", "stop_reason", "error", "waiter", "want_any",
    )  # fmt: skip

    def __init__(
        self, rid: int, request_id: str, loop: Any, ids: list[int], params: SamplingParams, tok: Any
    ):
        self.rid, self.request_id, self.loop = rid, request_id, loop
        self.prompt_ids, self.params = ids, params
        self.detok = IncrementalDetokenizer(tok, ids, params.stop) if tok is not None else None
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.pending: list[int] = []
        self.pending_lps: list[dict[int, float]] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.want_any = True  # False: wake only when the request ends (inside a stream interval)


def _resolve_all(futures: list[asyncio.Future]) -> None:
    for f in futures:
        if not f.done():
            f.set_result(None)


class AsyncLLM:
    """Streams requests through an engine core; see the module docstring."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        _engine: Any | None = None,
        engine_core: str = "process",
        engine_factory: str | None = None,
        loras: dict[str, str | Path] | None = None,
        on_progress: Any | None = None,
        **engine_kwargs: Any,
    ) -> None:
        self._lock = threading.Lock()
        self._streams: dict[int, _Stream] = {}
        self._by_id: dict[str, int] = {}
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._counter = itertools.count()
        self._error: str | None = None
        self._stats: dict[str, Any] = {}
        loras = {k: str(v) for k, v in (loras or {}).items()}
        if _engine is None and engine_core == "thread":
            from llmray.engine.llm import build_engine

            _engine = build_engine(model_dir, loras=loras, **engine_kwargs)
        if _engine is not None:
            self.engine = _engine
            self.tokenizer = _engine.tokenizer
            self.core: ProcessCore | ThreadCore = ThreadCore(_engine, self._dispatch)
        else:
            if model_dir is None:
                raise ValueError("pass a model directory or an in-memory engine")
            self.engine = None
            spec = {"model_dir": str(model_dir), "engine_kwargs": engine_kwargs, "loras": loras,
                    "engine_factory": engine_factory}  # fmt: skip
            self.core = ProcessCore(spec, self._dispatch, on_progress)
            self.tokenizer = _load_tokenizer(model_dir)  # while the core loads the model
            self.core.wait_ready()
        info = self.core.info
        self.max_model_len = int(info["max_model_len"])
        self.vocab_size = int(info["vocab_size"])
        self._loras: list[str] = list(info["loras"])

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any | None = None, **engine_kwargs: Any) -> AsyncLLM:
        """An in-memory model (tests, benches): the core runs in a thread of this process."""
        from llmray.engine.llm import build_engine

        return cls(_engine=build_engine(model=model, tokenizer=tokenizer, **engine_kwargs))

    # --- state ------------------------------------------------------------------------------------
    def is_alive(self) -> bool:
        return self._error is None and self.core.is_alive()

    @property
    def core_pid(self) -> int | None:
        return self.core.pid

    def stats(self) -> dict[str, Any]:
        """The engine's counters as of its latest step (they cross from the core with every step)."""
        with self._lock:
            return {**self._stats, "core_pid": self.core.pid}

    def list_loras(self) -> list[str]:
        return list(self._loras)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(self._error)

    # --- messages from the core (reader thread, or the core thread) -------------------------------
    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        wake: list[_Stream] = []
        with self._lock:
            if kind == "step":
                _, rids, tokens, finished, lps, stats = msg
                self._stats = stats
                streams = self._streams
                for rid, tok in zip(rids, tokens, strict=True):
                    st = streams.get(rid)
                    if st is None:
                        continue  # aborted meanwhile
                    st.pending.append(tok)
                    if lps is not None and st.logprobs is not None:
                        st.pending_lps.append(lps.get(rid) or {})
                    if st.waiter is not None and st.want_any:
                        wake.append(st)
                for rid, reason, stop_reason in finished:
                    st = streams.get(rid)
                    if st is not None and st.finish_reason is None:
                        st.finish_reason, st.stop_reason = reason, stop_reason
                        if st.waiter is not None:
                            wake.append(st)
            elif kind == "error":
                _, rid, message, param = msg
                wake += self._fail([rid], RequestError(message, param))
            elif kind == "failed":
                wake += self._fail(msg[1], RuntimeError(msg[2]))
            elif kind == "dead":
                self._error = msg[1]
                wake += self._fail(list(self._streams), EngineDeadError(msg[1]))
                calls, self._calls = list(self._calls.values()), {}
                for loop, fut in calls:
                    _call_soon(loop, _settle, fut, None, EngineDeadError(msg[1]))
            elif kind == "reply":
                _, call_id, ok, result = msg
                call = self._calls.pop(call_id, None)
                if call is not None:
                    loop, fut = call
                    if ok and isinstance(result, list):
                        self._loras = list(result)
                    _call_soon(
                        loop, _settle, fut, result if ok else None, None if ok else _call_error(result)
                    )
            elif kind == "progress":
                logger.info("%s", msg[1])
            by_loop: dict[Any, list[asyncio.Future]] = defaultdict(list)
            for st in wake:
                if st.waiter is not None:
                    by_loop[st.loop].append(st.waiter)
                    st.waiter = None
        for loop, futures in by_loop.items():
            _call_soon(loop, _resolve_all, futures)

    def _fail(self, rids: list[int], error: BaseException) -> list[_Stream]:
        out = []
        for rid in rids:
            st = self._streams.get(rid)
            if st is not None and st.error is None:
                st.error = error
                out.append(st)
        return out

    # --- requests ---------------------------------------------------------------------------------
    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(
                    "this engine has no tokenizer: pass prompts as lists of token ids", "prompt"
                )
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("the prompt is empty: it must hold at least one token", "prompt")
        return ids

    async def generate_stream(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        lora: str | None = None,
        interval_s: float | Callable[[], float] = 0.0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's new tokens and text as they arrive (at most once per ``interval_s`` after
        the first); the last output has ``finish_reason`` set. A refused request raises ValueError
        (``RequestError``, naming the field); a dead engine ``EngineDeadError``."""
        self._check_alive()
        params = sampling_params or SamplingParams()
        ids = self._encode(prompt)
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        with self._lock:
            if request_id in self._by_id:
                raise RequestError(f"request id {request_id!r} is already running")
            rid = next(self._counter)
            st = _Stream(rid, request_id, loop, ids, params, self.tokenizer)
            self._streams[rid] = st
            self._by_id[request_id] = rid
        self.core.send(("add", rid, ids, params, lora))
        finished = False
        last_yield: float | None = None
        try:
            while True:
                await self._wait(st, last_yield, interval_s)
                out = self._take(st)
                if out is None:
                    continue
                finished = out.finished
                yield out
                if finished:
                    return
                last_yield = loop.time()
        finally:
            with self._lock:
                self._streams.pop(rid, None)
                self._by_id.pop(request_id, None)
            if not finished or st.stop_reason is not None:
                self.core.send(("abort", [rid]))  # a no-op in the core if it finished there already

    async def _wait(
        self, st: _Stream, last_yield: float | None, interval: float | Callable[[], float]
    ) -> None:
        loop = st.loop
        interval_s = interval() if callable(interval) else interval  # a callable: adapted to load
        if interval_s > 0 and last_yield is not None:
            remaining = last_yield + interval_s - loop.time()
            if remaining > 0:  # inside the interval: wake early only if the request ends
                with self._lock:
                    fut = None
                    if st.finish_reason is None and st.error is None:
                        fut = st.waiter = loop.create_future()
                        st.want_any = False
                if fut is not None:
                    handle = loop.call_later(remaining, _resolve_all, [fut])
                    try:
                        await fut
                    finally:
                        handle.cancel()
                        with self._lock:
                            st.waiter = None
        while True:
            with self._lock:
                if st.pending or st.finish_reason is not None or st.error is not None:
                    return
                fut = st.waiter = loop.create_future()
                st.want_any = True
            await fut

    def _take(self, st: _Stream) -> RequestOutput | None:
        with self._lock:
            new, st.pending = st.pending, []
            lps, st.pending_lps = st.pending_lps, []
            finish, error = st.finish_reason, st.error
        if error is not None:
            raise error
        p = st.params
        if st.detok is not None and new:
            if p.stop:
                for i, tok in enumerate(new):
                    hit = st.detok.update([tok])
                    if hit is not None:  # cut here; the core may have run a token or two further
                        new, lps = new[: i + 1], lps[: i + 1]
                        finish, st.stop_reason = "stop", hit
                        st.finish_reason = finish
                        break
            else:
                st.detok.update(new)
        if not new and finish is None:
            return None
        st.token_ids.extend(new)
        if st.logprobs is not None:
            st.logprobs.extend(lps)
        stop_reason = st.stop_reason
        return RequestOutput(
            request_id=st.request_id,
            prompt_token_ids=st.prompt_ids,
            token_ids=list(st.token_ids),
            text=st.detok.text if st.detok is not None else "",
            finish_reason=finish,
            logprobs=list(st.logprobs) if st.logprobs is not None else None,
            new_token_ids=new,
            new_text=st.detok.delta(finish is not None) if st.detok is not None else "",
            stop_reason=stop_reason,
        )

    async def abort(self, request_id: str) -> None:
        """End a running request: its stream yields a last output with finish_reason "abort"."""
        with self._lock:
            rid = self._by_id.get(request_id)
            st = self._streams.get(rid) if rid is not None else None
            if st is not None and st.finish_reason is None:
                st.finish_reason = "abort"
                if st.waiter is not None:
                    _call_soon(st.loop, _resolve_all, [st.waiter])
                    st.waiter = None
        if rid is not None:
            self.core.send(("abort", [rid]))

    # --- adapters ---------------------------------------------------------------------------------
    async def _call(self, name: str, *args: Any) -> Any:
        self._check_alive()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            call_id = next(self._counter)
            self._calls[call_id] = (loop, fut)
        self.core.send(("call", call_id, name, args))
        return await fut

    async def add_lora(self, name: str, path: str | Path) -> None:
        """Serve the PEFT adapter in ``path`` as ``name``; replaces an adapter of that name (requests running
        on the old one finish on it). AdapterError (a ValueError) names what is wrong with the directory."""
        await self._call("add_lora", name, str(path))

    async def remove_lora(self, name: str) -> None:
        """Stop serving ``name`` (KeyError if unknown); requests already accepted for it still complete."""
        await self._call("remove_lora", name)

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop the core; with ``drain_timeout_s`` running requests first finish (for up to that long)."""
        self.core.shutdown(drain_timeout_s)


def _load_tokenizer(model_dir: str | Path) -> Any:
    from llmray.model.tokenizer import Tokenizer

    try:
        return Tokenizer.load(model_dir)
    except Exception:  # a directory without tokenizer files: prompts must be token ids
        logger.warning("no tokenizer in %s: prompts must be token ids, outputs carry no text", model_dir)
        return None


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that event loop is closed: nobody waits any more
        pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _call_error(result: tuple[str, str]) -> BaseException:
    kind, message = result
    if kind == "KeyError":
        return KeyError(message)
    if kind.endswith("AdapterError"):  # the core's error type survives the pipe: callers catch it by type
        return AdapterError(message)
    if kind.endswith(("ValueError", "RequestError")):
        return ValueError(message)
    return RuntimeError(f"{kind}: {message}")
