"""Errors the engine raises for a request it refuses; ``param`` names the request field at fault."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine cannot run (the client's mistake); ``param`` is the field to fix, if one is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineDeadError(RuntimeError):
    """The engine core stopped (process exited, or its loop died): retry on another replica."""
