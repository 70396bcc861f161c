"""Tool calls in the Qwen3 / Hermes format: prompt side (tools for templates that lack them, the forced-call
prompt prefix and grammar) and output side (``<tool_call>{"name", "arguments"}</tool_call>`` parsed into
OpenAI ``tool_calls``, streamed as OpenAI streams them: a first delta with index, id, type and name, then
``arguments`` fragments).

``ToolCallParser`` is incremental: it streams content up to a ``<tool_call>`` tag (holding back a partial tag),
emits the header once the name is read, then the arguments value character-exact as it arrives (a small JSON
scanner finds where it ends; the wrapper's closing brace and tag are dropped). A block that is not in the
``{"name": ..., "arguments": ...}`` order is parsed whole when it closes; one that is not JSON stays content.
The non-streamed parse runs the same parser, so both agree.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*', re.S)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


class _ValueScanner:
    """Finds where one JSON value ends in a stream of characters (objects, arrays, strings, literals)."""

    def __init__(self) -> None:
        self.started = False
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.scalar = False
        self.done = False

    def feed(self, text: str) -> int:
        """How many characters of ``text`` belong to the value (all of them unless it ends inside)."""
        for i, ch in enumerate(text):
            if not self.started:
                if ch.isspace():
                    continue
                self.started = True
                if ch == '"':
                    self.in_string = True
                elif ch in "{[":
                    self.depth = 1
                else:
                    self.scalar = True
                continue
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.done = True
                        return i + 1
                continue
            if self.scalar:
                if ch in ",}] \n\t\r":
                    self.done = True
                    return i
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


@dataclass
class ToolCallParser:
    """Feed output text; get OpenAI-style deltas: ``{"content": str}`` or ``{"tool_call": {...}}``."""

    calls: list[ToolCall] = field(default_factory=list)
    state: str = "content"  # content | header | args | tail
    buf: str = ""
    _scanner: _ValueScanner | None = None

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.buf += text
        out: list[dict[str, Any]] = []
        while self.buf:
            if self.state == "content":
                start = self.buf.find(TOOL_START)
                if start < 0:
                    cut = len(self.buf) - _partial_suffix(self.buf, TOOL_START)
                    if self._is_noise(self.buf[:cut]):
                        break  # whitespace after a tool call waits: it may lead into real content
                    self._content(out, self.buf[:cut])
                    self.buf = self.buf[cut:]
                    break
                if not self._is_noise(self.buf[:start]):
                    self._content(out, self.buf[:start])
                self.buf, self.state = self.buf[start + len(TOOL_START) :], "header"
            elif self.state == "header":
                m = _HEADER.match(self.buf)
                end = self.buf.find(TOOL_END)
                if m and (end < 0 or m.end() <= end):
                    self._open(out, json.loads(f'"{m.group(1)}"'))
                    self.buf, self.state, self._scanner = self.buf[m.end() :], "args", _ValueScanner()
                elif end >= 0:  # a block in another shape: parse it whole
                    self._whole_block(out, self.buf[:end], closed=True)
                    self.buf, self.state = self.buf[end + len(TOOL_END) :], "content"
                else:
                    break
            elif self.state == "args":
                scanner = self._scanner
                assert scanner is not None, "the header state starts the arguments' scanner"
                if not scanner.started:
                    self.buf = self.buf.lstrip()
                    if not self.buf:
                        break
                n = scanner.feed(self.buf)
                if n:
                    self.calls[-1].arguments += self.buf[:n]
                    out.append({"tool_call": {"index": len(self.calls) - 1, "arguments": self.buf[:n]}})
                self.buf = self.buf[n:]
                if not scanner.done:
                    break
                self.state = "tail"
            else:  # tail: the wrapper's closing brace and the end tag are dropped
                end = self.buf.find(TOOL_END)
                if end < 0:
                    self.buf = self.buf[len(self.buf) - _partial_suffix(self.buf, TOOL_END) :]
                    break
                self.buf, self.state = self.buf[end + len(TOOL_END) :], "content"
        return out

    def finish(self) -> list[dict[str, Any]]:
        """End of output: flush held-back content; an unclosed block is parsed whole if it can be."""
        out: list[dict[str, Any]] = []
        buf, self.buf = self.buf, ""
        if self.state == "content" and not self._is_noise(buf):
            self._content(out, buf)
        elif self.state == "header":
            self._whole_block(out, buf, closed=False)
        self.state = "content"
        return out

    # --- helpers ------------------------------------------------------------------------------------
    def _is_noise(self, text: str) -> bool:
        """Whitespace between or after tool calls is not content."""
        return not text or (bool(self.calls) and not text.strip())

    def _content(self, out: list[dict[str, Any]], text: str) -> None:
        if text:
            out.append({"content": text})

    def _open(self, out: list[dict[str, Any]], name: str) -> None:
        call = ToolCall(new_call_id(), name)
        self.calls.append(call)
        header = {
            "index": len(self.calls) - 1,
            "id": call.id,
            "type": "function",
            "name": name,
            "arguments": "",
        }
        out.append({"tool_call": header})

    def _whole_block(self, out: list[dict[str, Any]], body: str, closed: bool) -> None:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            obj = None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            out.append({"content": TOOL_START + body + (TOOL_END if closed else "")})
            return
        args = obj.get("arguments", obj.get("parameters", {}))
        self._open(out, obj["name"])
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        self.calls[-1].arguments = text
        out.append({"tool_call": {"index": len(self.calls) - 1, "arguments": text}})


def parse_tool_calls(text: str, prefix: str = "") -> tuple[str | None, list[ToolCall]]:
    """Non-streamed: ``(content or None, tool calls)``; ``prefix`` is output the server wrote into the prompt."""
    p = ToolCallParser()
    p.feed(prefix)
    deltas = p.feed(text) + p.finish()
    content = "".join(d["content"] for d in deltas if "content" in d)
    return (content if content.strip() else None), p.calls


# --- prompt side ---------------------------------------------------------------------------------------
def template_takes_tools(template: str | None) -> bool:
    return template is not None and "tools" in template and TOOL_START in template


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    """The tool instructions Qwen3's template writes, for templates that do not take ``tools``."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{lines}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments", "{}")
    args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return f'{TOOL_START}\n{{"name": "{fn.get("name", "")}", "arguments": {args_text}}}\n{TOOL_END}'


def messages_for_plain_template(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict]:
    """For a template without tool support: tools go into the system message, assistant tool calls into the
    assistant's text, tool results into user turns wrapped in ``<tool_response>`` (as Qwen3 renders them)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (content + "\n" if content else "") + calls})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool", None)
    if tools:
        text = tools_system_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def forced_call(tools: list[dict[str, Any]], name: str | None) -> tuple[str, dict[str, Any]]:
    """The prompt prefix the server writes and the JSON schema the grammar enforces after it.

    One function (named, or "required" with one tool): the prefix holds the name, the grammar the arguments.
    Several ("required"): the prefix opens the block, the grammar allows ``{"name": one of them,
    "arguments": that function's parameters}``.
    """
    fns = [t["function"] for t in tools]
    if name is not None or len(fns) == 1:
        fn = next(f for f in fns if name is None or f["name"] == name)
        return f'{TOOL_START}\n{{"name": {json.dumps(fn["name"])}, "arguments": ', _params(fn)
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": _params(f)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in fns
    ]
    return f"{TOOL_START}\n", {"anyOf": variants}


def _params(fn: dict[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return params
