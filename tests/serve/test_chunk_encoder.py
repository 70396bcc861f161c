"""``ChunkEncoder``'s pre-encoded SSE lines are byte for byte ``json.dumps`` of the chunk functions."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from llmray.serve.render import ChoiceState, ChunkEncoder, chat_chunk, completion_chunk


def _ev(index: int, text: str, finish: str | None = None, **extra) -> dict:
    ev = {"index": index, "text": text, "num_tokens": 1, "finish_reason": finish, "prompt_tokens": 3,
          "completion_tokens": 1, "logprobs": None}  # fmt: skip
    ev.update(extra)
    return ev


EVENTS = [
    _ev(0, "Hello"),
    _ev(1, ""),
    _ev(0, ' "quoted" \\ back\nslash \u00e9\u4e2d\U0001f600 \ud7ff'),
    _ev(0, "", reasoning="think"),
    _ev(1, "x", tool_calls=[{"index": 0, "function": {"name": "f", "arguments": "{}"}}]),
    _ev(0, "tail", logprobs=[{"token": "tail", "logprob": -0.5, "top": [["tail", -0.5]]}]),
    _ev(0, "", "stop"),
    _ev(1, "end", "length"),
]


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_encoded_lines_equal_json_dumps_of_the_chunks(kind: str) -> None:
    req = SimpleNamespace(model='m "1"\u00e9')
    make = completion_chunk if kind == "completions" else chat_chunk
    enc = ChunkEncoder(kind, "cmpl-abc", 1764300000, req)
    fast_states: dict[int, ChoiceState] = {}
    ref_states: dict[int, ChoiceState] = {}
    for ev in EVENTS:
        line = enc.encode(dict(ev), fast_states.setdefault(ev["index"], ChoiceState()))
        st = ref_states.setdefault(ev["index"], ChoiceState())
        chunk = make("cmpl-abc", 1764300000, req, dict(ev), st)
        st.add(dict(ev))
        assert line == (None if chunk is None else f"data: {json.dumps(chunk)}\n\n")
    assert [s.text for s in fast_states.values()] == [s.text for s in ref_states.values()]
