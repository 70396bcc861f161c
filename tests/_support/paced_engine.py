"""An engine double paced like a GPU engine: the serving stack's own ceiling, measured without a model.

``PacedEngine`` speaks ``LLMEngine``'s contract as ``llmray.engine.core.EngineCore`` uses it (``add_request``,
``step``, ``abort``, ``stats`` ...), so it runs inside the real engine core process and everything above it
is the real code: the pipe protocol, ``AsyncLLM`` (detokenization, stream intervals), ``LLMServer``, the
ingress, Serve. Each step takes ``step_ms`` (a sleep: no CPU, like a GPU step) and gives every running
request (at most ``max_num_seqs``) one token: a batch of 256 at 7 ms is ~36,000 tok/s, the H200's rate on
Qwen3-0.6B. ``step_ms=0`` emits as fast as the host can; default ``$LLMRAY_PACED_STEP_MS`` or 7.

``llmray serve --engine-factory _support.paced_engine:PacedAsyncLLM --model DIR`` (``tests/`` on
PYTHONPATH; DIR holds a tokenizer, e.g. from ``write_tokenizer_dir``) or ``PacedAsyncLLM(DIR, step_ms=7)``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llmray.model.tokenizer import Tokenizer, char_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,"


def write_tokenizer_dir(out: str | Path) -> Path:
    """A directory holding only a char tokenizer (the paced engine needs no weights)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer.json").exists():
        char_tokenizer(ALPHABET).save(out)
    return out


class PacedEngine:
    """A stand-in ``LLMEngine``: FIFO admission up to ``max_num_seqs``, one token per running request per step."""

    def __init__(
        self,
        model_dir: str | Path,
        loras: dict[str, str] | None = None,
        step_ms: float | None = None,
        max_num_seqs: int = 256,
        max_model_len: int = 2048,
        **_: Any,
    ) -> None:
        self.tokenizer = Tokenizer.load(model_dir)
        vocab = self.tokenizer.vocab_size
        self.model_config = SimpleNamespace(vocab_size=vocab)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.max_model_len = max_model_len
        if step_ms is None:  # through `llmray serve`, whose flags carry no step time
            step_ms = float(os.environ.get("LLMRAY_PACED_STEP_MS", "7"))
        self.step_s = step_ms / 1000.0
        self.max_num_seqs = max_num_seqs
        self.scheduler = SimpleNamespace(block_manager=SimpleNamespace(num_blocks=8192))
        self.detokenize = self.delta_outputs = self.stream_outputs = True
        self._tokens = self.tokenizer.encode(ALPHABET)  # plain characters: every token has text
        self.waiting: deque[list] = deque()
        self.running: dict[int, list] = {}  # rid -> [rid, produced, max_tokens]
        self.prompt_tokens_total = self.generation_tokens_total = 0
        self._loras: dict[str, str] = dict(loras or {})

    def add_request(self, rid: int, ids: list[int], params: Any, lora: str | None = None) -> None:
        if len(ids) + params.max_tokens > self.max_model_len:
            from llmray.engine.errors import RequestError

            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds {self.max_model_len}",
                "max_tokens",
            )
        self.prompt_tokens_total += len(ids)
        self.waiting.append([rid, 0, params.max_tokens])

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[tuple]:
        t0 = time.perf_counter()
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            self.running[req[0]] = req
        outs, toks, done = [], self._tokens, []
        for rid, req in self.running.items():
            req[1] += 1
            finish = "length" if req[1] >= req[2] else None
            outs.append((rid, toks[req[1] % len(toks)], finish, None, None))
            if finish:
                done.append(rid)
        for rid in done:
            del self.running[rid]
        self.generation_tokens_total += len(outs)
        rest = self.step_s - (time.perf_counter() - t0)
        if rest > 0:
            time.sleep(rest)
        return outs

    def abort(self, rid: int) -> Any:
        if self.running.pop(rid, None) is not None:
            return rid
        for req in self.waiting:
            if req[0] == rid:
                self.waiting.remove(req)
                return rid
        return None

    def abort_all(self) -> list[int]:
        ids = list(self.running) + [r[0] for r in self.waiting]
        self.running.clear()
        self.waiting.clear()
        return ids

    def pop_failed(self) -> list[tuple[int, str]]:
        return []

    def list_loras(self) -> list[str]:
        return sorted(self._loras)

    def add_lora(self, name: str, path: str) -> None:
        self._loras[name] = path

    def remove_lora(self, name: str) -> None:
        if name not in self._loras:
            raise KeyError(f"unknown LoRA adapter {name!r}")
        del self._loras[name]

    def stats(self) -> dict[str, Any]:
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "kv_cache_usage": 0.0,
            "num_free_blocks": 8192,
            "num_total_blocks": 8192,
            "prefix_cache_hits": 0,
            "prefix_cache_queries": 0,
            "num_preemptions": 0,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "num_loras": len(self._loras),
        }


def PacedAsyncLLM(model_dir: str, loras: dict[str, str] | None = None, **engine_kwargs: Any) -> Any:  # noqa: N802
    """The real ``AsyncLLM`` whose engine core process runs a ``PacedEngine`` (an ``engine_factory``)."""
    from llmray.engine.async_llm import AsyncLLM

    return AsyncLLM(
        model_dir, engine_factory="_support.paced_engine:PacedEngine", loras=loras or {}, **engine_kwargs
    )
