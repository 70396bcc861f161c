"""Constrained decoding: specs (``spec.py``), token bytes of any tokenizer (``vocab.py``), xgrammar compilation
cached per spec with limits, and the per-request ``TokenConstraint`` (``compiler.py``). xgrammar is imported
only when the first constrained request arrives."""

from llmray.engine.structured.spec import MAX_SPEC_BYTES, StructuredOutput

__all__ = ["MAX_SPEC_BYTES", "StructuredOutput", "GrammarCompiler", "GrammarConstraint"]


def __getattr__(name: str):  # lazy: compiler.py needs torch and (at use) xgrammar
    if name in ("GrammarCompiler", "GrammarConstraint"):
        from llmray.engine.structured import compiler

        return getattr(compiler, name)
    raise AttributeError(name)
