"""Chat / prompt-completion JSONL: validation with line numbers, template rendering, assistant-only targets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmray.model.tokenizer import Tokenizer
from llmray.train import chat_data
from llmray.train.chat_data import IGNORE, ChatDataError


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> Tokenizer:
    return Tokenizer.load(tiny_model_dir)


def _write(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def _loss_text(tok: Tokenizer, ex: chat_data.TokenizedExample) -> str:
    return tok.decode([t for t in ex.targets.tolist() if t != IGNORE], skip_special_tokens=False)


def test_chat_targets_cover_exactly_the_assistant_turns(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ]
    ex = chat_data.tokenize_example(tok, chat_data.parse_line(json.dumps({"messages": msgs}), 1))
    text = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert tok.decode(ex.input_ids.tolist(), skip_special_tokens=False) == text
    # each reply with its end-of-turn token, nothing of the system/user turns
    assert _loss_text(tok, ex) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
    # targets are the next tokens: where a target is set it equals input_ids shifted by one
    set_ = ex.targets[:-1] != IGNORE
    assert np.array_equal(ex.targets[:-1][set_], ex.input_ids[1:][set_])
    assert ex.targets[-1] == IGNORE


def test_weight_zero_turn_and_content_parts(tok):
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]},
        {"role": "assistant", "content": "Skip me.", "weight": 0},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Keep me.", "weight": 1},
    ]
    ex = chat_data.tokenize_example(tok, chat_data.parse_line(json.dumps({"messages": msgs}), 1))
    assert _loss_text(tok, ex) == "Keep me.<|im_end|>\n"
    assert "Hi there" in tok.decode(ex.input_ids.tolist())


def test_prompt_completion_loss_on_completion_and_eos(tok):
    ex = chat_data.tokenize_example(tok, chat_data.parse_line('{"prompt": "2+2=", "completion": " 4"}', 1))
    assert tok.decode(ex.input_ids.tolist(), skip_special_tokens=False) == "2+2= 4<|endoftext|>"
    assert _loss_text(tok, ex) == " 4<|endoftext|>"


def test_bad_lines_reported_with_line_numbers(tmp_path, tok):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = _write(
        tmp_path / "d.jsonl",
        [
            good,
            "",  # blank lines are skipped, not errors
            '{"messages": [{"role": "user", "content": "a"}',  # line 3: truncated JSON
            {"messages": [{"role": "user", "content": "only a question"}]},  # line 4: no assistant
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 5
            {"prompt": "p"},  # line 6: no completion
            good,
            "[1, 2]",  # line 8: not an object
        ],
    )
    with pytest.raises(ChatDataError) as err:
        chat_data.tokenize_file(path, tok, seq_len=64)
    assert [n for n, _ in err.value.errors] == [3, 4, 5, 6, 8]
    msg = str(err.value)
    assert f"{path}:3: not valid JSON" in msg
    assert f"{path}:4: no assistant message" in msg
    assert "messages[0].role='robot'" in msg
    assert f"{path}:8: expected a JSON object" in msg


def test_truncation_and_unlearnable_example(tmp_path, tok):
    long_user = {"role": "user", "content": "word " * 200}
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "answer " * 100}]},
        {"messages": [long_user, {"role": "assistant", "content": "late"}]},
    ]
    path = _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(ChatDataError) as err:
        chat_data.tokenize_file(path, tok, seq_len=48)
    assert [n for n, _ in err.value.errors] == [2]
    assert "raise --seq-len" in str(err.value)
    examples, stats = chat_data.tokenize_file(_write(tmp_path / "ok.jsonl", rows[:1]), tok, seq_len=48)
    assert stats["truncated"] == 1 and len(examples[0].input_ids) == 48 and examples[0].targets[-1] == IGNORE


def test_length_bucketed_batches_deterministic_and_complete(tok):
    rng = np.random.default_rng(0)
    examples = [
        chat_data.TokenizedExample(i, np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64))
        for i, n in enumerate(rng.integers(5, 200, size=50))
    ]
    b1 = chat_data.length_bucketed_batches(examples, 8, seed=3, epoch=1)
    assert b1 == chat_data.length_bucketed_batches(examples, 8, seed=3, epoch=1)
    assert b1 != chat_data.length_bucketed_batches(examples, 8, seed=3, epoch=2)
    assert sorted(i for b in b1 for i in b) == list(range(50))
    # bucketing: padding is far below what random batches would need
    pad = sum(max(len(examples[i].input_ids) for i in b) * len(b) for b in b1)
    assert pad < 1.15 * sum(len(e.input_ids) for e in examples)
    ids, tgt = chat_data.collate(examples, b1[0], pad_id=7)
    assert ids.shape == tgt.shape and (tgt[ids == 7] == IGNORE).all()


def test_padding_to_a_multiple_leaves_the_loss_unchanged():
    """CUDA graphs pad batch lengths to a multiple (fewer shapes); the loss must not see the padding."""
    import torch

    from llmray.config import ModelConfig
    from llmray.model.qwen3 import Qwen3ForCausalLM

    rng = np.random.default_rng(0)
    examples = [
        chat_data.TokenizedExample(i, rng.integers(1, 60, n), np.where(rng.random(n) < 0.5, IGNORE, 3))
        for i, n in enumerate((9, 13))
    ]
    ids, tgt = chat_data.collate(examples, [0, 1], pad_id=0)
    ids64, tgt64 = chat_data.collate(examples, [0, 1], pad_id=0, pad_multiple=16)
    assert ids.shape == (2, 13) and ids64.shape == (2, 16) and (tgt64[:, 13:] == IGNORE).all()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="torch")
    with torch.no_grad():
        torch.testing.assert_close(model(ids64, targets=tgt64), model(ids, targets=tgt), rtol=1e-5, atol=1e-6)


def test_arrays_roundtrip(tok):
    ex = [
        chat_data.tokenize_example(tok, chat_data.parse_line('{"prompt": "a", "completion": "bc"}', n))
        for n in (1, 2)
    ]
    back = chat_data.from_arrays(chat_data.to_arrays(ex))
    assert [b.line for b in back] == [1, 2]
    assert all(
        np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.targets, b.targets)
        for a, b in zip(ex, back)
    )


# Qwen3's published chat template (tool branches left out): the final reply after the last user query
# gets an empty <think></think> block, earlier replies do not, so renderings of prefixes are no prefixes.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def test_qwen3_template_multi_turn(tok):
    qtok = Tokenizer(tok.backend, {**tok.config, "chat_template": QWEN3_TEMPLATE})
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ]
    ex = chat_data.tokenize_example(qtok, chat_data.parse_line(json.dumps({"messages": msgs}), 1))
    text = tok.decode(ex.input_ids.tolist(), skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nGreen.<|im_end|>\n")
    assert "<|im_start|>assistant\nBlue.<|im_end|>" in text
    assert _loss_text(qtok, ex) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"  # the think block is context


def test_reply_equal_to_an_earlier_user_message_is_located_after_it(tok):
    msgs = [
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "sure"},
        {"role": "user", "content": "sure"},
        {"role": "assistant", "content": "ok"},
    ]
    ex = chat_data.tokenize_example(tok, chat_data.parse_line(json.dumps({"messages": msgs}), 1))
    assert _loss_text(tok, ex) == "sure<|im_end|>\nok<|im_end|>\n"
    # the first trained token is the first reply's, not the first user message's "ok"
    first = int((ex.targets != IGNORE).nonzero()[0][0]) + 1
    assert tok.decode(ex.input_ids[first:].tolist(), skip_special_tokens=False).startswith("sure<|im_end|>")
