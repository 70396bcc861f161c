"""What a constrained request asks for: ``StructuredOutput`` (the names follow vLLM's structured outputs).

Exactly one of ``json`` (a JSON schema, as a dict or JSON text), ``json_object`` (any JSON object), ``regex``,
``choice`` (one of these strings) or ``grammar`` (EBNF, GBNF dialect as xgrammar reads it). Optional
``prefix`` / ``suffix`` are literal text the constrained document must be wrapped in (tool calls:
``<tool_call>\\n`` ... ``\\n</tool_call>``). ``backend`` picks the grammar library: ``"auto"`` (default) is
llguidance for json / json_object / regex / choice (its masks are far cheaper inside JSON strings) and
xgrammar for ``grammar`` (the EBNF dialect we document is xgrammar's); ``"llguidance"`` or ``"xgrammar"``
asks for one explicitly (llguidance reads ``grammar`` as Lark, or GBNF converted to Lark). Sizes are checked here (ValueError naming the field), so an
oversized request is refused before it reaches the engine; whether a schema compiles is checked by the
grammar compiler (``llmray.engine.structured.compiler``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_SPEC_BYTES = 64 * 1024  # a schema / grammar / regex larger than this is refused
MAX_CHOICES = 1024
MAX_AFFIX_CHARS = 256
KINDS = ("json", "json_object", "regex", "choice", "grammar")
BACKENDS = ("auto", "llguidance", "xgrammar")
AUTO_BACKEND = {  # the library each kind gets under backend="auto"
    "json": "llguidance",
    "json_object": "llguidance",
    "regex": "llguidance",
    "choice": "llguidance",
    "grammar": "xgrammar",
}


def _err(name: str, what: str) -> ValueError:
    return ValueError(f"structured_output.{name} {what}")


@dataclass(frozen=True)
class StructuredOutput:
    """A typed, validated, hashable constraint spec. ``key`` identifies its compiled grammar in the cache."""

    json: Any = None  # dict / bool schema, or its JSON text; stored as canonical JSON text
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    prefix: str = ""
    suffix: str = ""
    backend: str = "auto"
    key: tuple[str, str, str, str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [k for k in KINDS if (getattr(self, k) not in (None, False))]
        if len(given) != 1:
            raise ValueError(
                f"structured_output needs exactly one of {', '.join(KINDS)}; got {given or 'none'}"
            )
        kind = given[0]
        text = ""
        if kind == "json":
            schema = self.json
            if isinstance(schema, str):
                if len(schema.encode()) > MAX_SPEC_BYTES:
                    raise _err("json", f"is larger than the limit of {MAX_SPEC_BYTES} bytes")
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise _err("json", f"is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise _err("json", f"must be a JSON schema object, got {type(schema).__name__}")
            try:
                # key order kept: a JSON grammar writes properties in the schema's order
                text = json.dumps(schema, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as e:
                raise _err("json", f"cannot be serialised as JSON: {e}") from None
            object.__setattr__(self, "json", text)
        elif kind == "json_object":
            if self.json_object is not True:
                raise _err("json_object", f"must be True, got {self.json_object!r}")
        elif kind == "choice":
            choices = self.choice
            if isinstance(choices, str) or not isinstance(choices, list | tuple):
                raise _err("choice", "must be a list of strings")
            choices = tuple(choices)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise _err("choice", "must be a non-empty list of non-empty strings")
            if len(choices) > MAX_CHOICES:
                raise _err("choice", f"holds {len(choices)} strings; at most {MAX_CHOICES} are allowed")
            object.__setattr__(self, "choice", choices)
            text = json.dumps(choices)
        else:
            value = getattr(self, kind)
            if not isinstance(value, str) or not value:
                raise _err(kind, "must be a non-empty string")
            text = value
        if len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
            raise _err(kind, f"is larger than the limit of {MAX_SPEC_BYTES} bytes")
        for name in ("prefix", "suffix"):
            v = getattr(self, name)
            if not isinstance(v, str) or len(v) > MAX_AFFIX_CHARS:
                raise _err(name, f"must be a string of at most {MAX_AFFIX_CHARS} characters")
        if self.backend not in BACKENDS:
            raise _err("backend", f"must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        backend = AUTO_BACKEND[kind] if self.backend == "auto" else self.backend
        object.__setattr__(self, "key", (kind, text, self.prefix, self.suffix, backend))

    @property
    def kind(self) -> str:
        return self.key[0]

    @property
    def library(self) -> str:
        """The grammar library this spec runs on ("llguidance" | "xgrammar"; ``auto`` resolved)."""
        return self.key[4]

    @classmethod
    def from_dict(cls, d: StructuredOutput | dict[str, Any]) -> StructuredOutput:
        """Build from ``{"json": ...}`` / ``{"regex": ...}`` etc. (how it crosses process boundaries)."""
        if isinstance(d, StructuredOutput):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"structured_output must be a mapping, got {type(d).__name__}")
        allowed = [*KINDS, "prefix", "suffix", "backend"]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"structured_output has unknown keys {unknown}; allowed: {allowed}")
        return cls(**d)
