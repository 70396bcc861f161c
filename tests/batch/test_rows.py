"""Row checks without Ray: prompts, messages through the chat template, sampling params, untokenizable text."""

from __future__ import annotations

import pytest
import torch

from llmray.batch.rows import RowError, prepare, sampling_params
from llmray.config import ModelConfig
from llmray.engine.llm import LLM
from llmray.model.qwen3 import Qwen3ForCausalLM
from llmray.model.tokenizer import char_tokenizer


@pytest.fixture(scope="module")
def engine():
    tok = char_tokenizer("abc")
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=64)
    torch.manual_seed(0)
    llm = LLM.from_model(Qwen3ForCausalLM(cfg, kernels="torch"), tok, kernels="torch", block_size=4)
    return llm.engine


def test_prepare_rows(engine):
    messages = [{"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "text", "text": "c"}]}]
    p = prepare({"messages": messages}, engine, {"max_tokens": 3}, None)
    text = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "abc"}], add_generation_prompt=True
    )
    assert p.prompt_ids == engine.tokenizer.encode(text)  # the server's rendering
    p = prepare(
        {"prompt": "abc", "sampling_params": {"max_completion_tokens": 5, "top_k": None}}, engine, {}, None
    )
    assert p.params.max_tokens == 5 and p.params.top_k == 0 and p.lora is None
    assert sampling_params({"stop": "x"}, {"temperature": 0}).stop == ["x"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "abc\u00e9"}, "cannot encode"),  # untokenizable: a char vocabulary without é
        ({"prompt": ""}, "empty"),
        ({"prompt": "a" * 70}, "context window"),
        ({"prompt": 3}, "must be a string"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "exactly one of"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"content": "a"}]}, "string 'role'"),
        ({"prompt_token_ids": ["a"]}, "list of integers"),
        ({"prompt": "a", "sampling_params": {"n": 2}}, "n must be 1"),
        ({"prompt": "a", "sampling_params": {"best": 1}}, "unknown sampling parameter"),
        ({"prompt": "a", "sampling_params": {"temperature": -1}}, "temperature"),
        ({"prompt": "a", "sampling_params": [1]}, "mapping"),
        ({"prompt": "a", "lora": "x"}, "LoRA"),
    ],
)
def test_bad_rows_say_why(engine, row, message):
    with pytest.raises(RowError, match=message):
        prepare(row, engine, {"max_tokens": 4}, None)


def test_shards_per_engine_keeps_engines_fed_and_leaves_work_to_share():
    from llmray.batch.cli import shards_per_engine

    assert shards_per_engine(40, 256, 1, 256) == 8  # 2,048 rows held: enough for 256 running + queued
    assert shards_per_engine(40, 1000, 1, 256) == 3
    assert shards_per_engine(4, 10, 1, 2) == 2  # never below 2
    assert shards_per_engine(1000, 8, 1, 256) == 16  # never above 16
    # two engines (both up before rows go out): at most each one's share
    assert shards_per_engine(16, 256, 2, 256) == 8
    assert shards_per_engine(17, 62, 2, 256) == 9
    assert shards_per_engine(400, 256, 2, 256) == 8
