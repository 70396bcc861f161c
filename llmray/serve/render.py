"""Turn LLMServer events into OpenAI JSON: stream chunks, final responses, usage, logprobs.

An event (see ``llmray.serve.server``) is one engine step for one choice: the text delta, the number of
new tokens, their logprobs (``{"token", "logprob", "top": [[token, logprob], ...]}`` each), the finish
reason and cumulative token counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llmray.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
    now,
)
from llmray.serve.structured_api import merge_call_deltas


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    text_len: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    has_logprobs: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    role_sent: bool = False
    reasoning: list[str] = field(default_factory=list)  # chat: reasoning_content deltas
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # chat: whole calls by index

    def add(self, ev: dict[str, Any]) -> None:
        if ev.get("reasoning"):
            self.reasoning.append(ev["reasoning"])
        if ev.get("tool_calls"):
            merge_call_deltas(self.tool_calls, ev["tool_calls"])
        self.text.append(ev["text"])
        self.text_len += len(ev["text"])
        if ev.get("logprobs") is not None:
            self.has_logprobs = True
            self.logprobs.extend(ev["logprobs"])
        self.finish_reason = ev["finish_reason"] or self.finish_reason
        self.prompt_tokens = ev["prompt_tokens"]
        self.completion_tokens = ev["completion_tokens"]


def usage_of(states: dict[int, ChoiceState], n: int, n_prompts: int) -> dict[str, int]:
    """Prompt tokens counted once per prompt (not per choice), completion tokens over all choices."""
    prompt = sum(states[p * n].prompt_tokens for p in range(n_prompts) if p * n in states)
    completion = sum(st.completion_tokens for st in states.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """The legacy completions format: parallel lists plus character offsets into the choice's text."""
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t: lp for t, lp in e["top"]} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    def item(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**item(e["token"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in e["top"]]}
            for e in entries
        ]
    }


class ChunkEncoder:
    """One stream's SSE ``data:`` lines: the plain text chunks (no logprobs; for chat, content only once the
    role was sent) from a prefix encoded once per request, byte for byte what ``json.dumps`` makes of
    ``completion_chunk`` / ``chat_chunk``; any other chunk through those functions."""

    def __init__(self, kind: str, rid: str, created: int, req: Any) -> None:
        self.kind, self.rid, self.created, self.req = kind, rid, created, req
        self.make = completion_chunk if kind == "completions" else chat_chunk
        obj = "text_completion" if kind == "completions" else "chat.completion.chunk"
        head = {"id": rid, "object": obj, "created": created, "model": req.model}
        self.head = "data: " + json.dumps(head)[:-1] + ', "choices": [{"index": '
        self.text_key = ', "text": ' if kind == "completions" else ', "delta": {"content": '
        self.tail = (
            ', "logprobs": null, "finish_reason": '
            if kind == "completions"
            else ('}, "logprobs": null, "finish_reason": ')
        )

    def encode(self, ev: dict[str, Any], st: ChoiceState) -> str | None:
        """The event's line (``None``: nothing to send), ``st`` updated with the event."""
        plain = ev.get("logprobs") is None and (
            self.kind == "completions"
            or (st.role_sent and not ev.get("reasoning") and not ev.get("tool_calls"))
        )
        if not plain:
            chunk = self.make(self.rid, self.created, self.req, ev, st)
            st.add(ev)
            return None if chunk is None else f"data: {json.dumps(chunk)}\n\n"
        text, finish = ev["text"], ev["finish_reason"]
        st.add(ev)
        if not text and finish is None:
            return None
        reason = "null" if finish is None else json.dumps(finish)
        return f"{self.head}{ev['index']}{self.text_key}{json.dumps(text)}{self.tail}{reason}}}]}}\n\n"


def completion_chunk(rid: str, created: int, req: Any, ev: dict[str, Any], st: ChoiceState) -> dict | None:
    if not ev["text"] and ev["finish_reason"] is None and not ev.get("logprobs"):
        return None
    lp = completion_logprobs(ev["logprobs"], st.text_len) if ev.get("logprobs") is not None else None
    choice = {"index": ev["index"], "text": ev["text"], "logprobs": lp, "finish_reason": ev["finish_reason"]}
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": req.model,
        "choices": [choice],
    }


def chat_chunk(rid: str, created: int, req: Any, ev: dict[str, Any], st: ChoiceState) -> dict | None:
    extra = {k: ev[k] for k in ("reasoning", "tool_calls") if ev.get(k)}
    if (
        st.role_sent
        and not ev["text"]
        and ev["finish_reason"] is None
        and not ev.get("logprobs")
        and not extra
    ):
        return None
    delta: dict[str, Any] = {"content": ev["text"]}
    if not st.role_sent:
        delta = {"role": "assistant", "content": ev["text"]}
        st.role_sent = True
    if "reasoning" in extra:
        delta["reasoning_content"] = extra["reasoning"]
    if "tool_calls" in extra:
        delta["tool_calls"] = extra["tool_calls"]
    lp = chat_logprobs(ev["logprobs"]) if ev.get("logprobs") is not None else None
    choice = {"index": ev["index"], "delta": delta, "logprobs": lp, "finish_reason": ev["finish_reason"]}
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": req.model,
        "choices": [choice],
    }


def final_response(kind: str, rid: str, req: Any, states: dict[int, ChoiceState], n_prompts: int) -> dict:
    """The non-streamed response body (``usage`` always included)."""
    usage = Usage(**usage_of(states, req.n, n_prompts))
    wants_lp = req.num_logprobs() is not None
    if kind == "completions":
        choices = [
            CompletionChoice(
                index=i,
                text="".join(st.text),
                logprobs=CompletionLogprobs.model_validate(completion_logprobs(st.logprobs, 0))
                if wants_lp
                else None,
                finish_reason=st.finish_reason,
            )
            for i, st in sorted(states.items())
        ]
        resp = CompletionResponse(id=rid, created=now(), model=req.model, choices=choices, usage=usage)
        return resp.model_dump()
    chat_choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(
                content="".join(st.text) if st.text_len or not st.tool_calls else None,
                reasoning_content="".join(st.reasoning) if st.reasoning else None,
                tool_calls=[st.tool_calls[k] for k in sorted(st.tool_calls)] or None,
            ),
            logprobs=ChatLogprobs.model_validate(chat_logprobs(st.logprobs)) if wants_lp else None,
            finish_reason=st.finish_reason,
        )
        for i, st in sorted(states.items())
    ]
    chat = ChatCompletionResponse(id=rid, created=now(), model=req.model, choices=chat_choices, usage=usage)
    return chat.model_dump()
