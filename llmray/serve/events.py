"""The one event type that crosses from ``LLMServer`` to the ingress (inside Ray streaming messages).

Each message is a list of events; an event is a ``TokenEvent`` (one choice's new text since the previous
event) or an ``ErrorEvent`` (the request failed: the OpenAI error body and the HTTP status). Plain dicts at
runtime (cheap to pickle, no class has to exist on the other side), typed for the code on both sides.
"""

from __future__ import annotations

from typing import Any, TypedDict

from llmray.serve.errors import APIError


class _TokenFields(TypedDict):
    index: int  # the choice (prompt index x n + choice)
    text: str  # new text (stop strings and held-back text excluded)
    num_tokens: int  # new tokens
    finish_reason: str | None  # "stop" | "length" | "abort" on the choice's last event
    prompt_tokens: int
    completion_tokens: int  # so far
    logprobs: list[dict[str, Any]] | None  # per new token: {"token", "logprob", "top": [[token, logprob]]}


class TokenEvent(_TokenFields, total=False):  # total=False: typing.NotRequired needs Python 3.11
    reasoning: str  # chat: new reasoning_content text (Qwen3 <think>)
    tool_calls: list[dict[str, Any]]  # chat: tool-call deltas


class ErrorEvent(TypedDict):
    error: dict[str, Any]  # {"message", "type", "param", "code"}
    status: int
    headers: dict[str, str]


Event = TokenEvent | ErrorEvent


def error_event(err: APIError) -> ErrorEvent:
    return {"error": err.body()["error"], "status": err.status, "headers": err.headers}


def merge_events(events: list[Event]) -> list[Event]:
    """Fold consecutive token events of one choice into one (an error event ends the list)."""
    out: list[Event] = []
    last_by_index: dict[int, TokenEvent] = {}
    for ev in events:
        if "error" in ev:
            out.append(ev)
            break
        prev = last_by_index.get(ev["index"])
        if prev is None or prev["finish_reason"] is not None:
            ev = ev.copy()
            out.append(ev)
            last_by_index[ev["index"]] = ev
            continue
        prev["text"] += ev["text"]
        prev["num_tokens"] += ev["num_tokens"]
        if ev.get("reasoning"):
            prev["reasoning"] = prev.get("reasoning", "") + ev["reasoning"]
        if ev.get("tool_calls"):
            prev["tool_calls"] = prev.get("tool_calls", []) + ev["tool_calls"]
        if ev["logprobs"] is not None:
            prev["logprobs"] = (prev["logprobs"] or []) + ev["logprobs"]
        for key in ("finish_reason", "prompt_tokens", "completion_tokens"):
            prev[key] = ev[key]
    return out
