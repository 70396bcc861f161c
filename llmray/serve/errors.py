"""Errors in the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}``.

``APIError`` carries an HTTP status and is raised anywhere in the serve path; it also travels from the
LLMServer replicas to the ingress as a plain dict (``to_dict`` / ``from_dict``) inside the event stream, so
no exception type has to survive Ray's serialization.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from llmray.serve.limits import MAX_ECHO_CHARS, MAX_MESSAGE_CHARS

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}

DEFAULT_CODES = {400: "invalid_value"}  # a 400 that names no more specific code: a bad field value


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr``-free, bounded text of a client-supplied value for an error message."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class APIError(Exception):
    """An error with an HTTP status, rendered as the OpenAI error envelope (message length bounded)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else DEFAULT_CODES.get(status, status)
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "headers": self.headers, **self.body()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APIError:
        e = d["error"]
        return cls(d.get("status", 500), e["message"], e.get("param"), e.get("code"), d.get("headers"))


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; drops pydantic's union-member tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part.startswith(("function-", "list["))):
            continue  # e.g. 'list[int]' / 'function-after[...]': which union branch failed
        else:
            out += f".{part}" if out else str(part)
    return out


class FieldError(ValueError):
    """A request-level (model validator) failure that still names its field: ``param``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def from_validation_error(err: ValidationError) -> APIError:
    """The first validation failure as a 400 naming the field (``param``) and what was wrong."""
    first = err.errors(include_url=False)[0]
    param = _loc_to_param(tuple(first.get("loc", ()))) or None
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):  # a model validator: the field it is about
        param = f"{param}.{cause.param}" if param else cause.param
        return APIError(400, str(cause), param=param, code="invalid_value")
    msg = first.get("msg", "invalid value")
    for prefix in _PYDANTIC_PREFIXES:  # pydantic's wrapping of a validator's ValueError
        msg = msg.removeprefix(prefix)
    if first.get("type") == "missing":
        message = f"'{param}' is a required field"
    elif param:
        given = first.get("input")
        shown = repr(given) if not isinstance(given, dict | list) else type(given).__name__
        message = f"invalid value for '{param}': {msg} (got {shown[:80]})"
    else:
        message = msg
    return APIError(400, message, param=param, code="invalid_value")


def engine_unavailable(message: str) -> APIError:
    """The retryable 503 for a request whose engine stopped (the client should send it again)."""
    return APIError(503, message, code="engine_unavailable", headers={"Retry-After": "1"})


def from_value_error(err: ValueError) -> APIError:
    """An engine ``ValueError`` as a 400 naming the field: the engine's ``RequestError.param`` (older
    engines' messages are searched for a field name)."""
    message = str(err)
    param = getattr(err, "param", None)
    if param is not None:
        return APIError(400, message, param=param, code="invalid_value")
    for name in (
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "logprobs",
        "prompt",
    ):
        if name in message:
            param = name
            break
    return APIError(400, message, param=param, code="invalid_value")
