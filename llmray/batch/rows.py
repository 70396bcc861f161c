"""One dataset row in, one engine request out, and back: prompt/messages, sampling params, result columns.

A row holds ``prompt`` (text), ``messages`` (OpenAI chat messages: the chat template is applied as the
server applies it) or ``prompt_token_ids``; optionally ``sampling_params`` (a dict of ``SamplingParams``
names, OpenAI aliases accepted) and ``lora`` (an adapter name). Anything wrong with a row is a
``RowError`` whose message lands in the row's ``error`` column.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from llmray.engine.outputs import RequestOutput
from llmray.engine.sampling_params import SamplingParams

RESULT_COLUMNS = ("generated_text", "num_generated_tokens", "num_prompt_tokens", "finish_reason", "error")
SAMPLING_NAMES = frozenset(f.name for f in fields(SamplingParams))
ALIASES = {"max_completion_tokens": "max_tokens"}  # OpenAI name -> engine name
MAX_ERROR_CHARS = 500


class RowError(ValueError):
    """What is wrong with one row (becomes its ``error`` column)."""


@dataclass
class Prepared:
    """A row ready for the engine."""

    prompt_ids: list[int]
    params: SamplingParams
    lora: str | None


def param_dict(row_params: Any, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The defaults overlaid with the row's dict (None values = unset: columnar formats fill keys other rows
    set with nulls), OpenAI aliases renamed, checked by building ``SamplingParams`` from it."""
    merged = dict(defaults or {})
    if row_params is not None:
        if not isinstance(row_params, dict):
            raise RowError(f"sampling_params must be a mapping, got {type(row_params).__name__}")
        merged.update({k: v for k, v in row_params.items() if v is not None})
    out: dict[str, Any] = {}
    for key, value in merged.items():
        name = ALIASES.get(key, key)
        if name == "n":
            if value != 1:
                raise RowError(
                    "sampling_params.n must be 1 in batch inference (one output row per input row)"
                )
            continue
        if name not in SAMPLING_NAMES:
            raise RowError(f"unknown sampling parameter {key!r}; known: {', '.join(sorted(SAMPLING_NAMES))}")
        out[name] = value
    sampling_params_of(out)
    return out


def sampling_params_of(params: dict[str, Any]) -> SamplingParams:
    """``SamplingParams`` from a dict of its field names (RowError when a value is wrong)."""
    try:
        return SamplingParams(**params)
    except (TypeError, ValueError) as e:
        raise RowError(str(e)) from None


def sampling_params(row_params: Any, defaults: dict[str, Any] | None = None) -> SamplingParams:
    """``SamplingParams`` from the defaults overlaid with the row's dict (see ``param_dict``)."""
    return sampling_params_of(param_dict(row_params, defaults))


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type", "text") != "text":
                raise RowError("message content parts must be text parts ({'type': 'text', 'text': ...})")
            parts.append(str(part.get("text") or ""))
        return "".join(parts)
    raise RowError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def prompt_of(row: dict[str, Any], tokenizer: Any) -> str | list[int]:
    """The row's prompt: its text, its token ids, or its messages rendered by the chat template."""
    messages, prompt, ids = row.get("messages"), row.get("prompt"), row.get("prompt_token_ids")
    given = [
        k for k, v in (("messages", messages), ("prompt", prompt), ("prompt_token_ids", ids)) if v is not None
    ]
    if len(given) != 1:
        which = " and ".join(given) if given else "none of them"
        raise RowError(f"a row needs exactly one of prompt, messages, prompt_token_ids (it has {which})")
    if ids is not None:
        ids = list(ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RowError("prompt_token_ids must be a list of integers")
        return ids
    if prompt is not None:
        if not isinstance(prompt, str):
            raise RowError(f"prompt must be a string, got {type(prompt).__name__}")
        return prompt
    if not isinstance(messages, list) or not messages:
        raise RowError("messages must be a non-empty list of {role, content} mappings")
    plain = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RowError("each message must be a mapping with a string 'role'")
        plain.append({"role": m["role"], "content": _message_text(m.get("content"))})
    if tokenizer is None:
        raise RowError("this engine has no tokenizer: messages cannot be rendered")
    try:
        return tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja TemplateError from the template's raise_exception
        raise RowError(f"the chat template rejected the messages: {clip(e)}") from None


def prepare(row: dict[str, Any], engine: Any, defaults: dict[str, Any] | None, lora: str | None) -> Prepared:
    """Check and encode a row for ``engine`` (an ``LLMEngine``) in one place; RowError says what is wrong.
    (The processor's pipeline splits this: llmray/batch/prepare.py tokenizes in a stage of its own.)"""
    prompt = prompt_of(row, engine.tokenizer)
    params = sampling_params(row.get("sampling_params"), defaults)
    name = row.get("lora") or lora
    if name is not None and not isinstance(name, str):
        raise RowError(f"lora must be an adapter name (a string), got {type(name).__name__}")
    return check_ids(engine, prompt, params, name)


def check_ids(engine: Any, prompt: str | list[int], params: SamplingParams, lora: str | None) -> Prepared:
    """Encode (text) and check a prompt against ``engine``: vocabulary, context window, adapter name."""
    try:
        ids = engine.encode(prompt)
        engine.validate(ids, params, lora)
    except RowError:
        raise
    except Exception as e:  # the tokenizer raises plain Exception for text it cannot encode
        raise RowError(clip(e)) from None
    return Prepared(ids, params, lora)


def clip(error: Any, limit: int = MAX_ERROR_CHARS) -> str:
    text = str(error)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def result(out: RequestOutput | None = None, error: str | None = None) -> dict[str, Any]:
    """The result columns of one row: from a finished output, or an error."""
    if out is None:
        return dict(
            generated_text=None, num_generated_tokens=0, num_prompt_tokens=0, finish_reason=None, error=error
        )
    return dict(
        generated_text=out.text,
        num_generated_tokens=len(out.token_ids),
        num_prompt_tokens=len(out.prompt_token_ids),
        finish_reason=out.finish_reason,
        error=error,
    )


def result_table(
    batch: Any,
    prepared: list[Prepared | str],
    outs: dict[int, RequestOutput],
    include_token_ids: bool,
    drop: tuple[str, ...] = (),
) -> Any:
    """The input batch (a pyarrow Table) without the ``drop`` columns, plus the result columns: row ``i``
    from ``outs[i]``, or its error when ``prepared[i]`` is one."""
    import pyarrow as pa

    results: list[dict[str, Any]] = []
    token_ids: list[list[int] | None] = []
    for i, p in enumerate(prepared):
        if isinstance(p, str):
            results.append(result(error=p))
            token_ids.append(None)
        else:
            results.append(result(outs[i]))
            token_ids.append(list(outs[i].token_ids))
    types = dict(
        generated_text=pa.string(),
        num_generated_tokens=pa.int64(),
        num_prompt_tokens=pa.int64(),
        finish_reason=pa.string(),
        error=pa.string(),
    )
    names = [*RESULT_COLUMNS, "generated_token_ids", *drop]
    table = batch.drop_columns([n for n in names if n in batch.column_names])
    for name in RESULT_COLUMNS:
        table = table.append_column(name, pa.array([r[name] for r in results], type=types[name]))
    if include_token_ids:
        table = table.append_column("generated_token_ids", pa.array(token_ids, type=pa.list_(pa.int64())))
    return table


def final_texts(tokenizer: Any, prompts: list[list[int]], outputs: list[list[int]]) -> list[str]:
    """Each output's text as the engine's incremental detokenizer builds it (decoded after the prompt's last
    few tokens, so leading spaces come out right; a trailing incomplete character left out), in two
    ``decode_batch`` calls, which let the GIL go."""
    from llmray.engine.detokenizer import _CONTEXT

    if tokenizer is None or not outputs:
        return [""] * len(outputs)
    ctx = [list(p[-_CONTEXT:]) for p in prompts]
    full_ids = [c + list(o) for c, o in zip(ctx, outputs, strict=True)]
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        prefix = backend.decode_batch(ctx, skip_special_tokens=True)
        full = backend.decode_batch(full_ids, skip_special_tokens=True)
    else:
        prefix, full = [tokenizer.decode(c) for c in ctx], [tokenizer.decode(f) for f in full_ids]
    return [
        f[len(p) :].rstrip("\ufffd") if len(f) > len(p) else "" for p, f in zip(prefix, full, strict=True)
    ]
