"""Request intake (llmray/engine/intake.py): prompt ids and request options checked, with the field to blame."""

from __future__ import annotations

import numpy as np
import pytest

from llmray.engine.errors import RequestError
from llmray.engine.intake import encode_prompt, validate_request
from llmray.engine.sampling_params import SamplingParams
from llmray.engine.scheduler import Scheduler


class _Chars:
    """A tokenizer of lowercase letters (ids 0..25)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") for c in text]


def test_prompt_ids_are_checked_and_kept_as_an_int64_array():
    ids, view = encode_prompt(iter([3, 0, 7]), None, vocab=8)  # an iterator is taken too
    assert ids == [3, 0, 7] and view.dtype == np.int64 and view.tolist() == ids
    assert encode_prompt("cab", _Chars(), vocab=26)[0] == [2, 0, 1]
    cases = [([], "empty"), ([1, 8], r"\[8\] are outside the vocabulary \[0, 8\)"), ([-1], r"\[-1\]"),
             ([1, "2"], "must be integers"), ([2**70], "must be integers")]  # fmt: skip
    for prompt, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            encode_prompt(prompt, None, vocab=8)
        assert e.value.param == "prompt"
    with pytest.raises(ValueError, match="no tokenizer"):
        encode_prompt("abc", None, vocab=8)


def test_request_options_are_checked_against_the_engine():
    sched = Scheduler(num_blocks=8, block_size=4, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=20)
    validate_request(10, SamplingParams(max_tokens=10, stop_token_ids=[7]), None, None, 8, sched)
    cases = [
        (10, SamplingParams(max_tokens=11), None, "max_tokens", r"21 tokens exceed the context window of 20"),
        (4, SamplingParams(max_tokens=2, stop_token_ids=[8]), None, "stop_token_ids", r"\[8\] are outside"),
        (4, SamplingParams(max_tokens=2), "a1", "model", "without LoRA support"),
    ]
    for n, params, lora, param, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            validate_request(n, params, lora, None, 8, sched)
        assert e.value.param == param
