"""OpenAI request/response schemas (the subset llmray serves), as pydantic models.

Requests ignore unknown fields (as vLLM does, so clients sending newer fields keep working); a wrong type
or an out-of-range value fails validation, which the ingress turns into a 400 naming the field.
Reference: https://platform.openai.com/docs/api-reference (completions, chat, models).
"""

from __future__ import annotations

import random
import re
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from llmray.engine.sampling_params import SamplingParams
from llmray.serve.errors import FieldError
from llmray.serve.limits import (
    MAX_INT32,
    MAX_LOGPROBS,
    MAX_N,
    MAX_PROMPTS,
    MAX_SEED,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
)
from llmray.serve.structured_api import StructuredFields, ToolCallItem, ToolFields


def _valid_unicode(text: str) -> str:
    """JSON allows escapes of lone UTF-16 surrogates (``"\\ud800"``); no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text must be valid Unicode; it holds a lone surrogate {text[e.start]!r} at position {e.start}"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]  # every client string that reaches the tokenizer


class _RequestBody(BaseModel):
    # NaN and +-Infinity (which Python's JSON parser accepts) are refused in every float field
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_RequestBody):
    include_usage: bool = False


class _SamplingFields(_RequestBody):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Text
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32)  # -1 and 0 both mean off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=MAX_INT32)]] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS
    )
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=MAX_INT32)
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items):
            raise ValueError("stop strings must be non-empty")
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(items)}")
        if any(len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"each stop string must be at most {MAX_STOP_CHARS} characters")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def num_logprobs(self) -> int | None:
        raise NotImplementedError

    def to_sampling_params(self, max_tokens: int, index: int = 0) -> SamplingParams:
        """The engine's settings for choice ``index`` (seeds ``seed + index``); ``max_tokens`` as resolved
        against the context window. The engine validates them (``RequestError`` names the field)."""
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min(self.min_tokens, max_tokens),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            min_p=self.min_p or 0.0,
            seed=None if self.seed is None else self.seed + index,
            stop=self.stop_list(),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logprobs=self.num_logprobs(),
            # both request models mix StructuredFields in (it owns response_format)
            structured_output=self.response_format_spec() if isinstance(self, StructuredFields) else None,
        )


class CompletionRequest(_SamplingFields, StructuredFields):
    """POST /v1/completions."""

    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=MAX_INT32)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and (
            not v or (not isinstance(v[0], int) and any(isinstance(p, list | str) and not p for p in v))
        ):
            raise ValueError("prompt must be non-empty")
        if isinstance(v, list) and v and isinstance(v[0], list | str) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.echo:
            raise FieldError("echo", "echo=true is not supported; send echo=false")
        if self.suffix:
            raise FieldError("suffix", "suffix is not supported; leave it out")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string, one token list, or a list of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)  # type: ignore[arg-type]  # no int list here (returned above): list[str] or list[list[int]]

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(_RequestBody):
    type: Literal["text"]
    text: Text


class ChatMessage(_RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallItem] | None = None  # an assistant turn that called tools
    tool_call_id: Text | None = None  # a tool result answers this call
    reasoning_content: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields, ToolFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _logprobs_flag(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs=true")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_adapter_name(name: object) -> str:
    """A LoRA adapter name is one path component: letters, digits, ``._-``; no ``..``, ``/`` or ``\\``.

    Names become the ``model`` clients send and may be joined to an adapter root directory, so a name like
    ``../../etc`` must never reach the filesystem.
    """
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or ".." in name:
        shown = name[:80] if isinstance(name, str) else type(name).__name__
        raise ValueError(
            f"invalid LoRA adapter name {shown!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, without '..' or path separators"
        )
    return name


# --- responses -------------------------------------------------------------------------------------
def fast_id() -> str:
    """32 random hex digits, like ``uuid4().hex`` without a ``getrandom`` system call per request (ids name
    requests in responses and logs; they guard nothing)."""
    return f"{random.getrandbits(128):032x}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{fast_id()}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmray"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- OpenAPI ---------------------------------------------------------------------------------------
def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**_inline_refs(defs[ref.removeprefix("#/$defs/")], defs), **_inline_refs(rest, defs)}
        return {k: _inline_refs(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def openapi_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads ``model`` from the raw body (so FastAPI cannot see it).

    Without it the served /openapi.json declares no request body, and clients, SDK generators and schema
    fuzzers (schemathesis) learn nothing about the fields. ``$defs`` are inlined (the models are not
    recursive), so the operation is self-contained.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline_refs(schema, defs)}},
        }
    }
