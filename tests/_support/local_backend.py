"""The ingress's backend over an in-process ``LLMServer`` (fast tests; no Ray): the production
``ReplicaBackend`` (the default deployment runs the HTTP app inside the LLMServer replica)."""

from __future__ import annotations

from llmray.serve.backends import ReplicaBackend as LocalBackend

MOCK_ENGINE = "_support.mock_engine:MockAsyncLLM"  # LLMServer(engine_factory=MOCK_ENGINE): no model

__all__ = ["MOCK_ENGINE", "LocalBackend"]
