"""Batch inference over datasets on Ray Data: ``build_processor`` (Python) and ``llmray batch`` (CLI)."""

from __future__ import annotations

from llmray.batch.processor import Processor, build_processor

__all__ = ["Processor", "build_processor"]
