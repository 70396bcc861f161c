"""The inference engine: paged KV cache, continuous batching, prefix caching, Triton paged attention.

Public API: ``llmray.engine.llm`` (``LLM``, ``AsyncLLM``, ``RequestOutput``) and
``llmray.engine.sampling_params.SamplingParams``. Layout: sequence.py, block_manager.py and scheduler.py
(pure Python), runner.py (the only device code), attention_metadata.py, sampler.py, detokenizer.py,
engine.py (``step()`` = schedule -> launch -> read back), cli.py (``llmray generate``).
"""
