"""A test double of the engine contract (``AsyncLLM``), so the serve layer is tested without a model.

``LLMServer(engine_factory="_support.mock_engine:MockAsyncLLM")``; it takes the engine's own ``SamplingParams``.

Same interface as ``llmray.engine.llm.AsyncLLM``: ``generate_stream`` (async generator of
``RequestOutput``), ``abort``, ``stats``, ``is_alive``, ``tokenizer``, ``max_model_len``, ``shutdown``.
Tokens are drawn from a seeded RNG (seed, else a hash of the prompt), so outputs are deterministic; a
per-token delay makes streaming, disconnects and backpressure observable. Each running request holds
``ceil(len / block_size)`` blocks of a fixed pool, like a paged KV cache. LoRA: ``add_lora`` /
``remove_lora`` / ``list_loras`` like the engine (a directory needs adapter_config.json and
adapter_model.safetensors, else ``ValueError``); a request's adapter name is mixed into its RNG seed, so
an adapter answers differently from the base model.
"""

from __future__ import annotations

import asyncio
import math
import random
import string
import uuid
from dataclasses import dataclass
from pathlib import Path

from llmray.model.tokenizer import Tokenizer, char_tokenizer


@dataclass
class MockRequestOutput:
    """Field-for-field copy of the engine's ``RequestOutput``."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None
    num_cached_tokens: int
    new_token_ids: list[int]
    new_text: str


class MockAsyncLLM:
    """Deterministic stand-in for ``AsyncLLM`` (``token_delay_s`` seconds per token)."""

    def __init__(
        self,
        model_dir: str | None = None,
        max_model_len: int = 256,
        num_kv_blocks: int = 64,
        block_size: int = 16,
        token_delay_s: float = 0.002,
        fail_after: int | None = None,
        loras: dict[str, str] | None = None,
        **_: object,
    ) -> None:
        self.tokenizer: Tokenizer = char_tokenizer(string.ascii_letters + string.digits + " .,!?\n")
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_total_blocks = num_kv_blocks
        self.token_delay_s = token_delay_s
        self.fail_after = fail_after  # raise RuntimeError after this many tokens (mid-stream errors)
        self._running: dict[str, int] = {}  # request_id -> blocks held
        self._aborted: set[str] = set()
        self._alive = True
        self._prompt_tokens = 0
        self._gen_tokens = 0
        self._words = [self.tokenizer.encode(w) for w in ("hello ", "world ", "ray ", "serve ", "llm. ")]
        self.loras: dict[str, str] = {}
        for name, path in (loras or {}).items():
            self._check_adapter(name, path)
            self.loras[name] = str(path)

    # --- LoRA (same contract as AsyncLLM) ---------------------------------------------------------
    @staticmethod
    def _check_adapter(name: str, path: str) -> None:
        p = Path(path)
        if not (p / "adapter_config.json").is_file():
            raise ValueError(f"adapter {name!r}: {p} has no adapter_config.json (not a PEFT adapter)")
        if not (p / "adapter_model.safetensors").is_file():
            raise ValueError(f"adapter {name!r}: {p} has no weights; expected adapter_model.safetensors")

    async def add_lora(self, name: str, path: str) -> None:
        self._check_adapter(name, path)
        self.loras[name] = str(path)

    async def remove_lora(self, name: str) -> None:
        if name not in self.loras:
            raise KeyError(f"unknown LoRA adapter {name!r}")
        del self.loras[name]

    def list_loras(self) -> list[str]:
        return sorted(self.loras)

    # --- contract ---------------------------------------------------------------------------------
    async def generate_stream(
        self, prompt, sampling_params, request_id: str | None = None, lora=None, interval_s: float = 0.0
    ):
        """Like ``AsyncLLM.generate_stream``: after the first output, at most one per ``interval_s``."""
        loop = asyncio.get_running_loop()
        held: MockRequestOutput | None = None
        last_yield: float | None = None
        async for out in self._tokens(prompt, sampling_params, request_id, lora):
            if held is not None:
                out.new_token_ids = held.new_token_ids + out.new_token_ids
                out.new_text = held.new_text + out.new_text
            held = out
            now = loop.time()
            interval = interval_s() if callable(interval_s) else interval_s
            if out.finish_reason or last_yield is None or now - last_yield >= interval:
                yield out
                held, last_yield = None, now

    async def _tokens(self, prompt, sampling_params, request_id: str | None = None, lora=None):
        if not self._alive:
            raise RuntimeError("engine loop is dead")
        if lora is not None and lora not in self.loras:
            raise ValueError(f"unknown LoRA adapter {lora!r}; this engine has {self.list_loras()}")
        sp = sampling_params
        rid = request_id or uuid.uuid4().hex
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) + sp.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({sp.max_tokens}) exceeds the context window of "
                f"{self.max_model_len} tokens"
            )
        seed = sp.seed if sp.seed is not None else hash(tuple(ids)) & 0xFFFF
        seed = seed if sp.temperature > 0 else 0
        rng = random.Random(seed if lora is None else f"{seed}/{lora}")  # an adapter answers differently
        eos = self.tokenizer.eos_token_id
        out_ids: list[int] = []
        text = ""
        sent = 0  # characters of text already streamed
        hold = max((len(s) for s in sp.stop), default=1) - 1
        logprobs: list[dict[int, float]] | None = [] if sp.logprobs is not None else None
        self._running[rid] = math.ceil(len(ids) / self.block_size)
        self._prompt_tokens += len(ids)
        finish = None
        try:
            while finish is None:
                await asyncio.sleep(self.token_delay_s)
                if rid in self._aborted:
                    finish = "abort"
                    break
                if self.fail_after is not None and len(out_ids) >= self.fail_after:
                    raise RuntimeError("mock engine failure")
                word = self._words[rng.randrange(len(self._words))]
                tok = word[len(out_ids) % len(word)]
                if not sp.ignore_eos and len(out_ids) >= 40 and rng.random() < 0.05:
                    tok = eos
                out_ids.append(tok)
                self._gen_tokens += 1
                self._running[rid] = math.ceil((len(ids) + len(out_ids)) / self.block_size)
                if logprobs is not None:
                    top = {t[0]: -1.0 - 0.5 * i for i, t in enumerate(self._words[: max(sp.logprobs, 1)])}
                    logprobs.append({tok: -0.5, **{k: v for k, v in top.items() if k != tok}})
                text += "" if tok == eos else self.tokenizer.decode([tok])
                if tok == eos:
                    finish = "stop"
                for s in sp.stop:
                    if s in text:
                        text, finish = text[: text.index(s)], "stop"
                if finish is None and len(out_ids) >= sp.max_tokens:
                    finish = "length"
                # hold back a tail that could still become a stop string
                safe = len(text) if finish else max(sent, len(text) - hold)
                new_text, sent = text[sent:safe], safe
                yield MockRequestOutput(rid, ids, list(out_ids), text, finish, logprobs, 0, [tok], new_text)
        finally:
            self._running.pop(rid, None)
            self._aborted.discard(rid)

    async def abort(self, request_id: str) -> None:
        if request_id in self._running:
            self._aborted.add(request_id)
            self._running.pop(request_id, None)

    def stats(self) -> dict:
        used = sum(self._running.values())
        return {
            "num_running": len(self._running),
            "num_waiting": 0,
            "kv_cache_usage": used / self.num_total_blocks,
            "num_free_blocks": self.num_total_blocks - used,
            "num_total_blocks": self.num_total_blocks,
            "prefix_cache_hits": 0,
            "prefix_cache_queries": 0,
            "num_preemptions": 0,
            "prompt_tokens_total": self._prompt_tokens,
            "generation_tokens_total": self._gen_tokens,
        }

    def is_alive(self) -> bool:
        return self._alive

    def kill(self) -> None:
        """Test hook: make the engine loop look dead (``check_health`` must then fail)."""
        self._alive = False

    def shutdown(self) -> None:
        self._alive = False
