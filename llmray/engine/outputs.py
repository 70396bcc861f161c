"""What the engine hands back per request (re-exported by llmray.engine.llm)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """A request's state after a step: the full output so far plus the delta since the previous yield."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens so far
    text: str  # generated text so far (stop string excluded)
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    logprobs: list[dict[int, float]] | None = (
        None  # per generated token: {token_id: logprob} (chosen + top-n)
    )
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    stop_reason: str | int | None = None  # the stop string or stop token that ended it, if any

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
