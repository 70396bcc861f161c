"""User-facing engine: ``LLM`` (offline batches) and ``AsyncLLM`` (streaming, for the server).

``LLM(model_dir, **engine_kwargs).generate(prompts, SamplingParams(...))`` loads a Hugging Face Qwen3
directory; ``LLM.from_model(model, tokenizer, **engine_kwargs)`` wraps an in-memory model (tests, benches).
``AsyncLLM`` (llmray/engine/async_llm.py, re-exported here) streams from an engine core that runs in its
own process (or a thread, for an in-memory model); a consumer that stops iterating aborts its request.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmray.config import EngineConfig
from llmray.engine.engine import LLMEngine
from llmray.engine.outputs import RequestOutput
from llmray.engine.sampling_params import SamplingParams
from llmray.model.checkpoint import DTYPES

if TYPE_CHECKING:
    from llmray.model.qwen3 import Qwen3ForCausalLM

__all__ = ["LLM", "AsyncLLM", "RequestOutput", "SamplingParams", "build_engine"]
logger = logging.getLogger("llmray.engine")


def resolve_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """device "auto" = cuda if available; dtype "auto" = bfloat16 on CUDA, float32 on CPU."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    )
    if config.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, DTYPES[config.dtype]


def make_engine_config(**engine_kwargs: Any) -> EngineConfig:
    """An ``EngineConfig`` from keyword options (ValueError names unknown ones)."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(engine_kwargs) - names)
    if unknown:
        raise ValueError(f"unknown engine options {unknown}; EngineConfig has {sorted(names)}")
    return EngineConfig(**engine_kwargs)


def build_engine(
    model_dir: str | Path | None = None,
    model: Qwen3ForCausalLM | None = None,
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
        # convert only if needed: ``.to()`` rebuilds the fused q/k/v and gate/up copies at new addresses, under
        # the CUDA graphs of an engine built earlier on this model (its replays then read freed memory)
        if any(_differs(p, device, dtype) for p in model.parameters()):
            model = model.to(device=device, dtype=dtype)
        model = model.eval()
        model.set_kernels(config.kernels)
    return LLMEngine(model, tokenizer, config, {k: str(v) for k, v in (loras or {}).items()})


def _differs(p: torch.Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    same_device = p.device.type == device.type and (device.index is None or p.device.index == device.index)
    return not same_device or (p.is_floating_point() and p.dtype != dtype)


def _prompt_list(prompts: str | list[int] | Sequence[str | list[int]]) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    ids = [t for t in items if isinstance(t, int)]
    if ids and len(ids) == len(items):
        return [ids]  # one prompt of token ids
    if ids:
        raise ValueError("prompts mixes token ids with prompts: pass one list of ids or a list of prompts")
    return [p for p in items if not isinstance(p, int)]


class _EngineFront:
    """What ``LLM`` and ``AsyncLLM`` share: construction from an in-memory model and engine accessors."""

    engine: LLMEngine

    def __init__(self, *, _engine: LLMEngine) -> None:
        self.engine = _engine

    @classmethod
    def from_model(cls, model: Qwen3ForCausalLM, tokenizer: Any | None = None, **engine_kwargs: Any):
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
        requests: Iterable[tuple | None],
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
                    try:
                        item = next(source)
                    except StopIteration:
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


from llmray.engine.async_llm import AsyncLLM  # noqa: E402  (the streaming front-end of an engine core)
