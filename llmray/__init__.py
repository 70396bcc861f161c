"""llmray: Qwen3-architecture LLMs from pretraining to production serving on Ray.

``from llmray import LLM, SamplingParams`` is the Python entry to the inference engine (imported lazily
so that ``import llmray`` stays cheap).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "__version__"]


def __getattr__(name: str):
    if name in ("LLM", "AsyncLLM", "RequestOutput"):
        from llmray.engine import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from llmray.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'llmray' has no attribute {name!r}")
