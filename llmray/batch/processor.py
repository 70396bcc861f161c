"""A Ray Data processor running the llmray engine over a dataset: ``build_processor(model_dir, ...)(ds)``.

Two stages: ``prepare_batch`` tasks (llmray/batch/prepare.py) parse rows, render chat templates and tokenize,
then the engine actors generate. One engine per actor (``num_gpus=1`` with ``use_gpu``, else a fraction of
a CPU, so a 2-core machine runs two). The default actor is asynchronous, as ``ray.data.llm``'s vLLM stage: Ray Data hands each actor
several batches at once (``max_concurrent_batches``), every batch's rows go into one feed, and a single
engine thread runs ``LLM.generate_stream`` over that feed, so the continuous batch stays full across
batch boundaries and no batch waits for another's slowest row. ``streaming=False`` gives the simple
synchronous actor (one batch at a time, ``generate_stream`` over it; the engine drains at each batch's
tail), kept for comparison (bench/batch.py measures both).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmray.batch.prepare import PREP_COLUMNS, PREP_ERROR, batch_rows, prepare_batch, prepared_rows
from llmray.batch.rows import Prepared, RowError, clip, final_texts, prepare, result_table
from llmray.batch.stats import EngineStats

__all__ = ["Processor", "build_processor"]


def _engine_kwargs(engine_kwargs: dict[str, Any] | None, loras: dict[str, str], use_gpu: bool) -> dict:
    kwargs = dict(engine_kwargs or {})
    if not use_gpu:
        kwargs.setdefault("device", "cpu")
    if loras:
        ranks = [
            json.loads((Path(p) / "adapter_config.json").read_text()).get("r", 16) for p in loras.values()
        ]
        kwargs.setdefault("max_lora_rank", max(16, *ranks))
        kwargs.setdefault("max_loras", min(len(loras), 4))
        kwargs.setdefault("max_cpu_loras", max(len(loras), 1))
    return kwargs


class _EngineHolder:
    """What both actor kinds share: the engine, row preparation and result columns."""

    def __init__(
        self,
        model_dir: str,
        engine_kwargs: dict[str, Any],
        loras: dict[str, str],
        defaults: dict[str, Any],
        include_token_ids: bool,
        torch_threads: int | None,
        max_in_flight: int | None,
        json_column: str | None = None,
        stats_dir: str | None = None,
    ) -> None:
        self.stats = EngineStats(stats_dir)  # starts its clock: the actor's start-up is measured from here
        import torch

        from llmray.engine.llm import LLM

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.llm = LLM(model_dir, loras=loras or None, **engine_kwargs)
        self.stats.mark("engine_ready")
        self.stats.write()
        self.defaults = defaults
        self.include_token_ids = include_token_ids
        self.max_in_flight = max_in_flight
        self.json_column = json_column

    def _prepare(self, batch: Any) -> list[Prepared | str]:
        """Each row ready for the engine, or its error: from the ``prepare_batch`` stage's columns, or (a batch
        that did not go through it) parsed and tokenized here."""
        if PREP_ERROR in batch.column_names:
            return prepared_rows(batch, self.llm.engine)
        out: list[Prepared | str] = []
        for row in batch_rows(batch, self.json_column):
            try:
                if isinstance(row, str):
                    raise RowError(row)
                out.append(prepare(row, self.llm.engine, self.defaults, None))
            except RowError as e:
                out.append(str(e))
        return out

    def _with_text(self, item: tuple) -> tuple:
        """From the engine thread, just before ``generate_stream`` adds ``item``'s request: only a row with
        stop strings is detokenized step by step (they are checked on the text); the others' text is decoded
        once they are done (``_finish``), which saves the engine loop a quarter of its host time."""
        self.llm.engine.detokenize = bool(item[2].stop)
        return item

    def _finish(self, batch: Any, prepared: list[Prepared | str], outs: dict[int, Any]) -> Any:
        done = [(i, p) for i, p in enumerate(prepared) if not isinstance(p, str) and not p.params.stop]
        texts = final_texts(
            self.llm.tokenizer, [p.prompt_ids for _, p in done], [outs[i].token_ids for i, _ in done]
        )
        for (i, _), text in zip(done, texts, strict=True):
            outs[i].text = text
        return result_table(batch, prepared, outs, self.include_token_ids, drop=PREP_COLUMNS)


class SyncEngineActor(_EngineHolder):
    """One batch at a time: ``generate_stream`` over the batch's rows (the engine drains at its tail)."""

    def __call__(self, batch: Any) -> Any:
        prepared = self._prepare(batch)
        feed = (
            self._with_text((i, p.prompt_ids, p.params, p.lora))
            for i, p in enumerate(prepared)
            if not isinstance(p, str)
        )
        # generate_stream hands each output back under the caller's id: here the row index
        outs: dict[Any, Any] = {}
        self.stats.busy(True)
        for out in self.llm.generate_stream(feed, max_in_flight=self.max_in_flight):
            outs[out.request_id] = out
            self.stats.finished(out)
        self.stats.busy(False)
        self.stats.write()
        return self._finish(batch, prepared, outs)


@dataclass
class _Call:
    """One batch waiting in an async actor: its finished rows, and one wake-up of its coroutine at a time
    (not one per row: each wake-up takes the GIL from the engine thread)."""

    loop: asyncio.AbstractEventLoop
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    items: deque = field(default_factory=deque)  # (row, output or exception), appended by the engine thread
    woken: bool = False  # a wake-up is on its way to the loop
    pending: set[int] = field(default_factory=set)

    def put(self, item: Any) -> None:
        """From the engine thread."""
        self.items.append(item)
        if not self.woken:
            self.woken = True
            self.loop.call_soon_threadsafe(self.ready.set)

    async def get_all(self) -> list[Any]:
        """On the loop: every item so far (waits for one)."""
        await self.ready.wait()
        self.ready.clear()
        self.woken = False  # before draining: an item appended after this line brings a new wake-up
        out = []
        while self.items:
            out.append(self.items.popleft())
        return out


class StreamingEngineActor(_EngineHolder):
    """Several batches at once; one engine thread runs ``generate_stream`` over a feed all batches share."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._feed: queue.SimpleQueue = queue.SimpleQueue()
        self._calls: dict[int, _Call] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="llmray-batch-engine", daemon=True)
        self._thread.start()

    # --- engine thread ------------------------------------------------------------------------
    def _source(self) -> Iterator[tuple | None]:
        engine, stats = self.llm.engine, self.stats
        while True:
            running = engine.has_unfinished()
            stats.busy(running)
            try:  # block while the engine is idle; never while requests are running
                item = self._feed.get(block=not running, timeout=0.5)
            except queue.Empty:
                yield None
            else:
                stats.busy(True)
                yield self._with_text(item)

    def _send(self, call_id: int, item: Any) -> None:
        with self._lock:
            call = self._calls.get(call_id)
        if call is not None:
            call.put(item)

    def _run(self) -> None:
        while True:
            try:
                for out in self.llm.generate_stream(self._source(), max_in_flight=self.max_in_flight):
                    caller_id: Any = out.request_id  # generate_stream hands back our (call id, row) id
                    call_id, row = caller_id
                    self.stats.finished(out)
                    self._send(call_id, (row, out))
            except Exception as e:  # a failed step: every batch waiting here fails, the engine carries on
                while True:
                    try:
                        self._feed.get_nowait()
                    except queue.Empty:
                        break
                with self._lock:
                    waiting = list(self._calls)
                for call_id in waiting:
                    self._send(call_id, (-1, RuntimeError(f"the engine failed: {clip(repr(e))}")))

    # --- Ray Data's side ----------------------------------------------------------------------
    async def __call__(self, batch: Any) -> AsyncIterator[Any]:
        if PREP_ERROR in batch.column_names:  # prepared by the prepare_batch stage: token ids already
            prepared = self._prepare(batch)
        else:
            prepared = await asyncio.to_thread(self._prepare, batch)  # tokenizing off the loop
        call_id = next(self._ids)
        call = _Call(asyncio.get_running_loop())
        with self._lock:
            self._calls[call_id] = call
        outs: dict[int, Any] = {}
        try:
            for i, p in enumerate(prepared):
                if not isinstance(p, str):
                    call.pending.add(i)
                    self._feed.put(((call_id, i), p.prompt_ids, p.params, p.lora))
            while call.pending:
                for row, out in await call.get_all():
                    if isinstance(out, BaseException):
                        raise out
                    outs[row] = out
                    call.pending.discard(row)
        finally:
            with self._lock:
                self._calls.pop(call_id, None)
        self.stats.write()
        yield self._finish(batch, prepared, outs)


@dataclass
class Processor:
    """``processor(ds)`` -> the dataset with result columns (see ``build_processor``)."""

    model_dir: str
    concurrency: int
    batch_size: int
    engine_kwargs: dict[str, Any]
    loras: dict[str, str]
    defaults: dict[str, Any]
    use_gpu: bool
    streaming: bool
    max_concurrent_batches: int
    num_cpus: float
    include_token_ids: bool
    max_in_flight: int | None
    json_column: str | None = None
    stats_dir: str | None = None
    wait_for_engines: bool | None = None
    preprocess: Callable[[dict], dict] | None = None
    postprocess: Callable[[dict], dict] | None = None
    prepare_stage: bool = True  # False: the engine actors tokenize (bench/batch.py compares)

    def cpus_needed(self) -> float:
        """CPUs the engine actors reserve (reading and preparing tasks come on top)."""
        return self.concurrency * (1 if self.use_gpu else self.num_cpus)

    def __call__(self, ds: Any) -> Any:
        import ray.data

        if self.preprocess is not None:
            ds = ds.map(self.preprocess, num_cpus=0.25)
        if self.prepare_stage:
            ds = ds.map_batches(
                prepare_batch,
                fn_kwargs=dict(
                    model_dir=self.model_dir, defaults=self.defaults, json_column=self.json_column
                ),
                batch_size=self.batch_size,
                batch_format="pyarrow",
                zero_copy_batch=True,
                num_cpus=0.25,
            )
        wait = self.concurrency > 1 if self.wait_for_engines is None else self.wait_for_engines
        if wait and ds.context.wait_for_min_actors_s <= 0:
            # rows go only to engines that are up: without this the first engine to start takes up to
            # max_concurrent_batches blocks (often the whole dataset) before the others are ready. The price:
            # Ray Data starts reading only then, instead of while the engines load.
            ds.context.wait_for_min_actors_s = 3600
        threads = None if self.use_gpu else max(1, (os.cpu_count() or 1) // self.concurrency)
        actor = StreamingEngineActor if self.streaming else SyncEngineActor
        per_actor = self.max_concurrent_batches if self.streaming else 1
        ds = ds.map_batches(
            actor,
            fn_constructor_kwargs=dict(
                model_dir=self.model_dir,
                engine_kwargs=self.engine_kwargs,
                loras=self.loras,
                defaults=self.defaults,
                include_token_ids=self.include_token_ids,
                torch_threads=threads,
                max_in_flight=self.max_in_flight,
                json_column=self.json_column,
                stats_dir=self.stats_dir,
            ),
            batch_size=self.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(
                size=self.concurrency,
                # a streaming actor already holds max_concurrent_batches blocks' rows in its feed: no
                # more blocks wait in its queue (they would be held back from the other engines)
                max_tasks_in_flight_per_actor=per_actor if self.streaming else 2,
                max_concurrent_calls_per_actor=per_actor,
            ),
            num_gpus=1 if self.use_gpu else 0,
            num_cpus=1 if self.use_gpu else self.num_cpus,
        )
        if self.postprocess is not None:
            ds = ds.map(self.postprocess, num_cpus=0.25)
        return ds


def build_processor(
    model_dir: str | Path,
    *,
    concurrency: int = 1,
    batch_size: int = 64,
    engine_kwargs: dict[str, Any] | None = None,
    lora: Mapping[str, str | Path] | None = None,
    preprocess: Callable[[dict], dict] | None = None,
    postprocess: Callable[[dict], dict] | None = None,
    use_gpu: bool = False,
    sampling_params: dict[str, Any] | None = None,
    streaming: bool = True,
    max_concurrent_batches: int = 8,
    wait_for_engines: bool | None = None,
    num_cpus: float = 0.5,
    include_token_ids: bool = False,
    max_in_flight: int | None = None,
    json_column: str | None = None,
    stats_dir: str | Path | None = None,
    prepare_stage: bool = True,
) -> Processor:
    """A processor for ``ray.data`` datasets: ``ds = build_processor(model_dir, ...)(ds)``.

    Input rows hold ``prompt``, ``messages`` or ``prompt_token_ids``, optionally ``sampling_params``
    (overlaid on ``sampling_params`` here), ``lora`` (a name in ``lora`` = {name: PEFT dir}) and any other
    columns, which are kept. Output rows add ``generated_text``, ``num_generated_tokens``,
    ``num_prompt_tokens``, ``finish_reason`` and ``error`` (None when fine; a bad row gets an error, the job
    goes on), plus ``generated_token_ids`` with ``include_token_ids``. ``concurrency`` engines (actors),
    each ``num_gpus=1`` with ``use_gpu``, else ``num_cpus``; ``preprocess``/``postprocess`` map rows
    before/after. ``max_in_flight`` bounds the requests in one engine (default 2 x max_num_seqs).
    ``json_column``: rows arrive as JSON object text in this column (heterogeneous JSONL rows, whose
    fields Arrow could not hold in one schema); a line that is no JSON object becomes an error row.
    ``max_concurrent_batches``: Ray Data tasks (blocks) an engine works on at once, none queued beyond.
    ``wait_for_engines`` (default: when ``concurrency`` > 1): hand rows out once every engine has started
    (the dataset's ``DataContext.wait_for_min_actors_s``, when unset, becomes an hour), so the first engine
    up does not take them all; without it, reading overlaps the engines' start-up.
    ``stats_dir``: each engine writes its timeline and totals there (``engine-<pid>.json``, local to the
    node the actor runs on; see ``EngineStats``). ``prepare_stage`` (default): rows are parsed, templated and
    tokenized by ``prepare_batch`` tasks before the engines; False: in the engine actors.
    """
    if concurrency < 1 or batch_size < 1 or max_concurrent_batches < 1:
        raise ValueError("concurrency, batch_size and max_concurrent_batches must be >= 1")
    loras = {str(k): str(v) for k, v in (lora or {}).items()}
    for name, path in loras.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"LoRA adapter {name!r}: {path} holds no adapter_config.json (a PEFT directory)")
    model = str(model_dir)
    if "://" not in model and not (Path(model) / "config.json").is_file():
        raise ValueError(f"--model {model}: no config.json there (a Hugging Face Qwen3 directory)")
    defaults = dict(sampling_params or {})
    from llmray.batch.rows import sampling_params as check

    check(None, defaults)  # bad defaults fail here, not in every row
    return Processor(
        model_dir=model,
        concurrency=concurrency,
        batch_size=batch_size,
        engine_kwargs=_engine_kwargs(engine_kwargs, loras, use_gpu),
        loras=loras,
        defaults=defaults,
        use_gpu=use_gpu,
        streaming=streaming,
        max_concurrent_batches=max_concurrent_batches,
        wait_for_engines=wait_for_engines,
        num_cpus=num_cpus,
        include_token_ids=include_token_ids,
        max_in_flight=max_in_flight,
        json_column=json_column,
        stats_dir=str(stats_dir) if stats_dir is not None else None,
        prepare_stage=prepare_stage,
        preprocess=preprocess,
        postprocess=postprocess,
    )
