"""Row preparation as a Ray Data stage ahead of the engines: parse, render the chat template, tokenize.

It runs in Ray Data tasks of its own (fused with the reading), so the engine actor receives token ids and
its engine thread never waits on tokenizing: a Hugging Face tokenizer's ``encode`` holds the GIL for the
whole call (milliseconds for a long prompt), and each time the engine thread let the GIL go (a CUDA call, a
queue wait) it could find it taken for that long. Prepared batches carry four extra columns (``PREP_*``):
the prompt's token ids, the sampling parameters as JSON, the adapter name, and the row's error (None when
the row is fine); the engine actor checks what needs the engine (vocabulary, context window, adapter names)
and drops the columns from its output.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from llmray.batch.rows import Prepared, RowError, clip, param_dict, prompt_of

PREP_IDS, PREP_PARAMS, PREP_LORA, PREP_ERROR = (
    "_llmray_ids",
    "_llmray_params",
    "_llmray_lora",
    "_llmray_error",
)
PREP_COLUMNS = (PREP_IDS, PREP_PARAMS, PREP_LORA, PREP_ERROR)
ROW_FIELDS = ("prompt", "messages", "prompt_token_ids", "sampling_params", "lora")


def parse_json_row(text: Any) -> dict[str, Any]:
    """A JSONL line's object (``json_column`` rows); RowError when it is no JSON object."""
    try:
        row = json.loads(text)
    except (TypeError, ValueError) as e:
        raise RowError(f"the line is not valid JSON: {clip(e, 200)}") from None
    if not isinstance(row, dict):
        raise RowError(f"the line must hold a JSON object, got {type(row).__name__}")
    return row


def batch_rows(batch: Any, json_column: str | None) -> list[dict[str, Any] | str]:
    """The fields of each row of a pyarrow batch that preparation reads (an error string for a bad line)."""
    if json_column is not None:
        out: list[dict[str, Any] | str] = []
        for text in batch.column(json_column).to_pylist():
            try:
                out.append(parse_json_row(text))
            except RowError as e:
                out.append(str(e))
        return out
    names = [n for n in ROW_FIELDS if n in batch.column_names]
    return list(batch.select(names).to_pylist()) if names else [{} for _ in range(batch.num_rows)]


def render(rows: list[dict[str, Any] | str], tokenizer: Any, defaults: dict[str, Any]) -> list[Any]:
    """Each row as (prompt text or ids, params dict, lora) or an error string; text is not tokenized yet."""
    out: list[Any] = []
    for row in rows:
        if isinstance(row, str):
            out.append(row)
            continue
        try:
            prompt = prompt_of(row, tokenizer)
            params = param_dict(row.get("sampling_params"), defaults)
            name = row.get("lora")
            if name is not None and not isinstance(name, str):
                raise RowError(f"lora must be an adapter name (a string), got {type(name).__name__}")
            out.append((prompt, params, name))
        except RowError as e:
            out.append(str(e))
    return out


def tokenize(items: list[Any], tokenizer: Any) -> list[Any]:
    """Text prompts to token ids, all of a batch in one ``encode_batch`` (it lets the GIL go and runs on
    several cores); when that fails, row by row, so only the rows it cannot encode become errors."""
    texts = [i for i, item in enumerate(items) if not isinstance(item, str) and isinstance(item[0], str)]
    if not texts:
        return items
    out = list(items)
    if tokenizer is None:
        for i in texts:
            out[i] = "this engine has no tokenizer: pass prompts as prompt_token_ids"
        return out
    try:
        encoded = tokenizer.encode_batch([items[i][0] for i in texts])
    except Exception:
        encoded = None
    for k, i in enumerate(texts):
        prompt, params, name = items[i]
        try:
            ids = encoded[k] if encoded is not None else tokenizer.encode(prompt)
        except Exception as e:  # the tokenizer raises plain Exception for text it cannot encode
            out[i] = clip(e)
            continue
        out[i] = (ids, params, name)
    return out


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str) -> Any:
    """The model's tokenizer, loaded once per worker process (None when the directory has none)."""
    from llmray.model.tokenizer import Tokenizer

    return Tokenizer.load(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else None


def prepare_batch(
    batch: Any, *, model_dir: str, defaults: dict[str, Any], json_column: str | None = None
) -> Any:
    """Ray Data ``map_batches`` function (a task, fused with the reading before it): the pyarrow batch plus
    the ``PREP_*`` columns."""
    import pyarrow as pa

    tokenizer = _tokenizer(model_dir)
    items = tokenize(render(batch_rows(batch, json_column), tokenizer, defaults), tokenizer)
    ok = [not isinstance(item, str) for item in items]
    columns = {
        PREP_IDS: pa.array([it[0] if good else None for it, good in zip(items, ok)], pa.list_(pa.int64())),
        PREP_PARAMS: pa.array(
            [json.dumps(it[1]) if good else None for it, good in zip(items, ok)], pa.string()
        ),
        PREP_LORA: pa.array([it[2] if good else None for it, good in zip(items, ok)], pa.string()),
        PREP_ERROR: pa.array([None if good else it for it, good in zip(items, ok)], pa.string()),
    }
    table = batch.drop_columns([n for n in PREP_COLUMNS if n in batch.column_names])
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


def prepared_rows(batch: Any, engine: Any) -> list[Prepared | str]:
    """The engine actor's side of a prepared batch: each row ready for ``engine`` or its error string.

    Token ids come out of Arrow through NumPy (one ``tolist`` per row, not a Python object per element)."""
    from llmray.batch.rows import check_ids, sampling_params_of

    ids_col = batch.column(PREP_IDS).combine_chunks()
    offsets = ids_col.offsets.to_numpy()
    values = ids_col.values.to_numpy(zero_copy_only=False)
    params = batch.column(PREP_PARAMS).to_pylist()
    loras = batch.column(PREP_LORA).to_pylist()
    errors = batch.column(PREP_ERROR).to_pylist()
    out: list[Prepared | str] = []
    for i, error in enumerate(errors):
        if error is not None:
            out.append(error)
            continue
        try:
            ids = values[offsets[i] : offsets[i + 1]].tolist()
            out.append(check_ids(engine, ids, sampling_params_of(json.loads(params[i])), loras[i]))
        except RowError as e:
            out.append(str(e))
    return out
