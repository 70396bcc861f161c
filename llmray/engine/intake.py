"""Request intake: a prompt's token ids and a request's options, checked before the request is scheduled.

``LLMEngine.add_request`` runs both checks (``llmray.batch`` runs them through ``LLMEngine.encode`` /
``validate`` before it adds a row). A client's mistake raises ``RequestError`` naming the field to blame.
"""

from __future__ import annotations

import array
import struct
from typing import TYPE_CHECKING, Any

import numpy as np

from llmray.engine.errors import RequestError
from llmray.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llmray.engine.scheduler import Scheduler
    from llmray.lora.manager import LoraManager


def encode_prompt(prompt: str | list[int], tokenizer: Any | None, vocab: int) -> tuple[list[int], np.ndarray]:
    """The prompt's ids, checked, as a list and an int64 array (the prefix cache hashes the array)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass prompts as lists of token ids")
        ids = tokenizer.encode(prompt)
        view = np.asarray(ids, dtype=np.int64)
    else:
        if not hasattr(prompt, "__len__"):  # (an iterator)
            prompt = list(prompt)
        try:  # (C loops: a long prompt's conversion and check are on its TTFT; struct's is the fastest)
            packed = array.array("q", struct.pack(f"{len(prompt)}q", *prompt))
        except (TypeError, OverflowError, ValueError, struct.error):
            raise RequestError(
                f"prompt token ids must be integers in the vocabulary [0, {vocab})", "prompt"
            ) from None
        ids = packed.tolist()
        view = np.frombuffer(packed, np.int64)
    if not ids:
        raise RequestError("the prompt is empty: it must hold at least one token", "prompt")
    if view.min() < 0 or view.max() >= vocab:
        bad = [t for t in ids if not 0 <= t < vocab]
        raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "prompt")
    return ids, view


def validate_request(
    prompt_len: int,
    params: SamplingParams,
    lora: str | None,
    manager: LoraManager | None,
    vocab: int,
    scheduler: Scheduler,
) -> None:
    """RequestError unless the adapter is served, the stop token ids are in the vocabulary and the prompt
    plus ``max_tokens`` fits the context window and the KV cache."""
    if lora is not None:
        if manager is None:
            raise RequestError(
                f"LoRA adapter {lora!r} requested, but this engine was started without LoRA support "
                "(pass loras={name: dir} or enable_lora=True)",
                "model",
            )
        if lora not in manager.paths:
            raise RequestError(f"unknown LoRA adapter {lora!r}; this engine has {manager.names()}", "model")
    bad = [t for t in params.stop_token_ids if t >= vocab]
    if bad:
        raise RequestError(
            f"SamplingParams.stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab})",
            "stop_token_ids",
        )
    try:
        scheduler.check_fits(prompt_len, params.max_tokens)
    except ValueError as e:
        raise RequestError(str(e), "max_tokens") from None
