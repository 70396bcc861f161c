"""The one event type that crosses from ``LLMServer`` to the ingress (inside Ray streaming messages).

Each message is a list of events; an event is a ``TokenEvent`` (one choice's new text since the previous
event) or an ``ErrorEvent`` (the request failed: the OpenAI error body and the HTTP status). Plain dicts at
runtime (cheap to pickle, no class has to exist on the other side), typed for the code on both sides.
"""

from __future__ import annotations

from typing import Any, TypedDict

from llmray.serve.errors import APIError


class TokenEvent(TypedDict):
    index: int  # the choice (prompt index x n + choice)
    text: str  # new text (stop strings and held-back text excluded)
    num_tokens: int  # new tokens
    finish_reason: str | None  # "stop" | "length" | "abort" on the choice's last event
    prompt_tokens: int
    completion_tokens: int  # so far
    logprobs: list[dict[str, Any]] | None  # per new token: {"token", "logprob", "top": [[token, logprob]]}


class ErrorEvent(TypedDict):
    error: dict[str, Any]  # {"message", "type", "param", "code"}
    status: int
    headers: dict[str, str]


Event = TokenEvent | ErrorEvent


def error_event(err: APIError) -> ErrorEvent:
    return {"error": err.body()["error"], "status": err.status, "headers": err.headers}
