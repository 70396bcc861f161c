"""The OpenAI fields for structured outputs, tools and thinking: request schemas, what they do to the prompt
and the engine request, and how each choice's output text turns into ``content`` / ``reasoning_content`` /
``tool_calls``.

- ``response_format`` (chat and completions): ``json_object`` / ``json_schema`` become the engine's
  ``structured_output`` (grammar-constrained decoding, ``llmray.engine.structured``).
- ``tools`` / ``tool_choice`` (chat): tools go through the chat template when it takes them, else into a
  system message. ``"none"`` leaves them out. ``"auto"`` parses ``<tool_call>`` blocks from the output. A named
  function, or ``"required"`` with one tool, appends ``<tool_call>\\n{"name": NAME, "arguments": `` to the
  prompt and constrains the output to that function's parameters; ``"required"`` with several tools appends
  ``<tool_call>\\n`` and constrains ``{"name": one of them, "arguments": its parameters}``.
- ``chat_template_kwargs`` (e.g. ``{"enable_thinking": false}``) are template variables; ``<think>`` blocks
  are split into ``reasoning_content`` when the template has thinking.
- Fields that would change the output and that we do not implement are a 400 naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from llmray.serve.events import TokenEvent
from llmray.serve.reasoning import ReasoningParser, prompt_opens_thinking, template_has_thinking
from llmray.serve.tool_calls import (
    ToolCallParser,
    forced_call,
    messages_for_plain_template,
    template_takes_tools,
)

MAX_TOOLS = 128
_FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
_TEMPLATE_KWARG = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_RESERVED_KWARGS = {"messages", "tools", "add_generation_prompt", "eos_token", "bos_token", "pad_token"}
# output-changing fields we do not implement -> 400 naming the field (unless the value is the default)
UNSUPPORTED = {
    "logit_bias": lambda v: bool(v),
    "functions": lambda v: v is not None,
    "function_call": lambda v: v is not None,
    "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]),
    "prediction": lambda v: v is not None,
    "web_search_options": lambda v: v is not None,
    "reasoning_effort": lambda v: v is not None,
    "best_of": lambda v: v not in (None, 1),
}
HINTS = {
    "functions": "use tools",
    "function_call": "use tool_choice",
    "reasoning_effort": ('use chat_template_kwargs {"enable_thinking": false} to turn Qwen3 thinking off'),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)


class JsonSchemaFormat(_Model):
    name: str = Field("response", pattern=_FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format of type "json_schema" needs a json_schema object')
        return self


class FunctionDef(_Model):
    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: FunctionName


class ToolCallFunction(_Model):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallItem(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class StructuredFields(_Model):
    """``response_format`` plus the refusal of output-changing fields we lack (both request kinds)."""

    response_format: ResponseFormat | None = None
    metadata: dict[str, Any] | None = None  # accepted, no effect on the output
    store: bool | None = None
    # declared only to be refused by name (400 with param) when set to something that changes the output
    logit_bias: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    best_of: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _refuse_unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        assert name is not None, "a field validator runs for a named field"
        if UNSUPPORTED[name](v):
            raise ValueError(f"{name} is not supported by this server; {HINTS.get(name, 'leave it out')}")
        return v

    def response_format_spec(self) -> dict[str, Any] | None:
        """The engine's ``structured_output`` for ``response_format`` (None for text)."""
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return {"json_object": True}
        assert rf.json_schema is not None, "ResponseFormat's validator requires json_schema for its type"
        return {"json": rf.json_schema.schema_}


class ToolFields(StructuredFields):
    """``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``chat_template_kwargs`` (chat only)."""

    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _distinct(cls, v: list[ToolDef] | None) -> list[ToolDef] | None:
        names = [t.function.name for t in v or []]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _choice_fits(cls, choice: Any, info: ValidationInfo) -> Any:
        names = [t.function.name for t in info.data.get("tools") or []]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"it names the function {choice.function.name!r}, which is not in tools")
        if choice == "required" and not names:
            raise ValueError('"required" needs tools')
        rf = info.data.get("response_format")
        forced = names and (choice == "required" or isinstance(choice, NamedToolChoice))
        if forced and rf is not None and rf.type != "text":
            raise ValueError("a forced tool call cannot be combined with response_format; use one of them")
        return choice

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in v or {}:
            if not _TEMPLATE_KWARG.fullmatch(key) or key in _RESERVED_KWARGS:
                raise ValueError(f"the key {key[:64]!r} is not allowed")
        return v

    def tool_mode(self) -> str:
        """ "none" (no tools in the prompt), "auto" (parsed from the output) or "forced" (grammar)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        return "forced" if self.forced_tool() else "auto"

    def forced_tool(self) -> bool:
        return bool(self.tools) and (
            self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        )

    def tool_dicts(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]


@dataclass
class ChatPlan:
    """What a chat request's tools / format / thinking fields do to one engine request."""

    prompt: str  # the rendered prompt (forced-call prefix included)
    structured_output: dict[str, Any] | None
    tool_mode: str = "none"
    forced_prefix: str = ""  # output the server wrote into the prompt (parsed as if generated)
    forced_name: str | None = None
    named: bool = False  # tool_choice named the function (its call finishes "stop", as OpenAI's)
    reasoning: bool = False  # split <think> blocks
    in_reasoning: bool = False  # the prompt left a think block open


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Chat messages (``ChatMessage`` models) as the dicts chat templates read."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        calls = getattr(m, "tool_calls", None)
        if calls:
            d["tool_calls"] = [
                {"id": c.id, "type": "function", "function": c.function.model_dump()} for c in calls
            ]
            d["content"] = m.text() or None
        for key in ("tool_call_id", "name", "reasoning_content"):
            value = getattr(m, key, None)
            if value is not None:
                d[key] = value
        out.append(d)
    return out


def plan_chat(req: Any, tokenizer: Any) -> ChatPlan:
    """Render the prompt for ``req`` (a chat request with ``ToolFields``) and decide the output handling.

    Template errors (jinja ``raise_exception``) propagate; the caller turns them into a 400."""
    template = getattr(tokenizer, "chat_template", None) or ""
    mode = req.tool_mode()
    tools = req.tool_dicts() if mode != "none" else None
    messages = template_messages(req.messages)
    kwargs = dict(req.chat_template_kwargs or {})
    if tools and not template_takes_tools(template):
        messages, tools = messages_for_plain_template(messages, tools), None
    elif not template_takes_tools(template):
        messages = messages_for_plain_template(messages, None)
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=req.add_generation_prompt, tokenize=False, tools=tools, **kwargs
    )
    spec = req.response_format_spec()
    plan = ChatPlan(prompt, spec, tool_mode=mode)
    if mode == "forced":
        named = req.tool_choice.function.name if not isinstance(req.tool_choice, str) else None
        prefix, schema = forced_call(req.tool_dicts(), named)
        plan.prompt += prefix
        plan.forced_prefix, plan.structured_output = prefix, {"json": schema}
        plan.forced_name = named or (req.tools[0].function.name if len(req.tools) == 1 else None)
        plan.named = named is not None
    else:
        plan.reasoning = template_has_thinking(template)
        plan.in_reasoning = plan.reasoning and prompt_opens_thinking(prompt)
    return plan


@dataclass
class ChoiceOutput:
    """One choice's output text -> OpenAI delta pieces (``content``, ``reasoning_content``, ``tool_calls``)."""

    plan: ChatPlan
    reasoning: ReasoningParser | None = None
    tools: ToolCallParser | None = None
    num_calls: int = 0
    started: bool = False
    pending: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.plan.reasoning:
            self.reasoning = ReasoningParser(self.plan.in_reasoning)
        if self.plan.tool_mode != "none":
            self.tools = ToolCallParser()
            self.pending = self.tools.feed(self.plan.forced_prefix) if self.plan.forced_prefix else []

    def feed(self, text: str, final: bool = False) -> dict[str, Any]:
        """``{"content": str, "reasoning_content": str, "tool_calls": [OpenAI tool-call deltas]}``."""
        reasoning, content = "", text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(text)
            if final:
                r2, c2 = self.reasoning.finish()
                reasoning, content = reasoning + r2, content + c2
        calls: list[dict[str, Any]] = []
        if self.tools is not None:
            deltas, self.pending = self.pending + self.tools.feed(content), []
            if final:
                deltas += self.tools.finish()
            content = "".join(d["content"] for d in deltas if "content" in d)
            calls = _openai_call_deltas([d["tool_call"] for d in deltas if "tool_call" in d])
            self.num_calls = len(self.tools.calls)
        return {"content": content, "reasoning_content": reasoning, "tool_calls": calls}

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """``"tool_calls"`` when the model called tools (auto, required); a named call finishes "stop"."""
        called = self.num_calls or self.plan.tool_mode == "forced"
        if engine_reason == "stop" and called and not self.plan.named:
            return "tool_calls"
        return engine_reason


def split_event(ev: TokenEvent, out: ChoiceOutput) -> None:
    """Rewrite a chat token event in place: ``text`` keeps the answer, ``reasoning`` and ``tool_calls``
    (OpenAI deltas) are added when present, and the finish reason becomes ``"tool_calls"`` when due."""
    final = ev["finish_reason"] is not None
    piece = out.feed(ev["text"], final=final)
    ev["text"] = piece["content"]
    if piece["reasoning_content"]:
        ev["reasoning"] = piece["reasoning_content"]
    if piece["tool_calls"]:
        ev["tool_calls"] = piece["tool_calls"]
    if final:
        ev["finish_reason"] = out.finish_reason(ev["finish_reason"])


def _openai_call_deltas(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parser deltas -> OpenAI ``tool_calls`` deltas, argument fragments of one call merged."""
    out: list[dict[str, Any]] = []
    for d in raw:
        if "name" in d:
            fn = {"name": d["name"], "arguments": d.get("arguments", "")}
            out.append({"index": d["index"], "id": d["id"], "type": "function", "function": fn})
        elif out and out[-1]["index"] == d["index"]:
            out[-1]["function"]["arguments"] += d["arguments"]
        else:
            out.append({"index": d["index"], "function": {"arguments": d["arguments"]}})
    return out


def merge_call_deltas(calls: dict[int, dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """Accumulate streamed tool-call deltas into whole calls (for the non-streamed response)."""
    for d in deltas:
        call = calls.setdefault(
            d["index"], {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if d.get("id"):
            call["id"] = d["id"]
        fn = d.get("function", {})
        if "name" in fn:
            call["function"]["name"] = fn["name"]
        call["function"]["arguments"] += fn.get("arguments", "")
