"""Constrained decoding: specs (``spec.py``), token bytes of any tokenizer (``vocab.py``), compilation cached
per spec with limits (``compiler.py``) over two grammar libraries — llguidance (``llguidance_backend.py``: JSON,
regex, choice by default; how it reads schemas: ``schema_rules.py``) and xgrammar (``xgrammar_backend.py``: EBNF
grammars by default) — and a step's masks filled in one call (``batch.py``), on a worker thread while the device
runs the forward (``step_masks.py``, ``mask_worker.py``). A library is imported only when the first spec that
needs it arrives."""

from llmray.engine.structured.spec import MAX_SPEC_BYTES, StructuredOutput

__all__ = ["MAX_SPEC_BYTES", "StructuredOutput", "GrammarCompiler"]


def __getattr__(name: str):  # lazy: compiler.py needs torch and (at use) a grammar library
    if name == "GrammarCompiler":
        from llmray.engine.structured import compiler

        return compiler.GrammarCompiler
    raise AttributeError(name)
