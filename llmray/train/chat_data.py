"""Fine-tuning data: chat JSONL (OpenAI fine-tuning format) and prompt/completion JSONL.

Each line is one example, either
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": "...", "weight": 0|1}, ...]}``
(rendered with the checkpoint's chat template; loss on the assistant turns only, ``weight: 0`` turns
excluded as in OpenAI's format) or
  ``{"prompt": "...", "completion": "..."}``
(plain text, no template: ``prompt + completion + eos``; loss on the completion and the eos token).

The whole file is validated before anything trains: every bad line is reported with its line number in
one :class:`ChatDataError`. Tokenised examples become ``(input_ids, targets)`` pairs where ``targets[t]`` is
the next token if that token belongs to an assistant turn and -100 otherwise (the model's loss ignores
-100), and are batched by length (length-bucketed batches, right-padded) so no batch mixes a 20-token and
a 1,000-token example and no example attends to another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmray.model.tokenizer import Tokenizer

IGNORE = -100
ROLES = ("system", "developer", "user", "assistant")
MAX_REPORTED_ERRORS = 20


class ChatDataError(ValueError):
    """A fine-tuning file has bad lines; ``errors`` holds ``(line_number, message)`` pairs."""

    def __init__(self, path: str | Path, errors: list[tuple[int, str]]) -> None:
        self.path = str(path)
        self.errors = errors
        shown = "\n".join(f"  {self.path}:{n}: {msg}" for n, msg in errors[:MAX_REPORTED_ERRORS])
        more = len(errors) - MAX_REPORTED_ERRORS
        tail = f"\n  ... and {more} more bad lines" if more > 0 else ""
        super().__init__(
            f"{len(errors)} bad line(s) in {self.path} (each line must be "
            '{"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...}):\n'
            f"{shown}{tail}"
        )


@dataclass
class Example:
    """One parsed line: chat ``messages`` or a ``prompt``/``completion`` pair."""

    line: int
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    completion: str | None = None


@dataclass
class TokenizedExample:
    """``input_ids`` (T,) and ``targets`` (T,) int64 arrays; targets are next-token ids or -100."""

    line: int
    input_ids: np.ndarray
    targets: np.ndarray
    truncated: bool = False

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


def _content_text(content: Any) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ValueError("content must be a string or a list of {'type': 'text', 'text': ...} parts")


def _parse_messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise ValueError('"messages" must be a non-empty list')
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role={role!r}; expected one of {', '.join(ROLES)}")
        if m.get("tool_calls") or m.get("function_call"):
            raise ValueError(
                f"messages[{i}] has tool/function calls, which llmray fine-tuning does not support"
            )
        if "content" not in m or m["content"] is None:
            raise ValueError(f"messages[{i}] has no content")
        try:
            content = _content_text(m["content"])
        except ValueError as e:
            raise ValueError(f"messages[{i}]: {e}") from None
        weight = m.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise ValueError(f"messages[{i}].weight={weight!r}; expected 0 or 1")
        if "weight" in m and role != "assistant":
            raise ValueError(f"messages[{i}].weight is only allowed on assistant messages")
        if role == "assistant" and weight and not content.strip():
            raise ValueError(f"messages[{i}] is an assistant message with empty content: nothing to learn")
        messages.append({"role": role, "content": content, "weight": weight})
    if not any(m["role"] == "assistant" and m["weight"] for m in messages):
        raise ValueError("no assistant message to learn from (every example needs one with weight 1)")
    return messages


def parse_line(text: str, line: int) -> Example:
    """Parse one JSONL line; raises ValueError with what is wrong (without the line number)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return Example(line=line, messages=_parse_messages(obj["messages"]))
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError('"prompt" and "completion" must both be strings')
        if not completion:
            raise ValueError('"completion" is empty: nothing to learn from')
        return Example(line=line, prompt=prompt, completion=completion)
    raise ValueError(f'no "messages" or "prompt"/"completion" key (keys: {sorted(obj)[:6]})')


def read_jsonl(path: str | Path) -> list[Example]:
    """Parse and validate a whole file; all bad lines are reported at once in a ChatDataError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fine-tuning data {path} not found")
    examples, errors = [], []
    with path.open(encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                examples.append(parse_line(text, n))
            except ValueError as e:
                errors.append((n, str(e)))
    if errors:
        raise ChatDataError(path, errors)
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _render(tok: Tokenizer, messages: list[dict[str, Any]]) -> str:
    """The chat template's text rendering of ``messages`` (no generation prompt)."""
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert isinstance(text, str), "apply_chat_template(tokenize=False) returns text"
    return text


def _assistant_spans(tok: Tokenizer, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return (text, character spans of the weighted assistant replies).

    Each message's (stripped) content is located in the rendering in order; an assistant reply's span
    runs from its content through the template's end-of-turn text (e.g. ``<|im_end|>\n``, taken from the
    conversation rendered up to that reply), so the model learns to stop. Locating content, rather than
    diffing renderings of prefixes, also works for templates whose history differs from a final turn
    (Qwen3 writes an empty ``<think></think>`` block only before the last reply); that block stays in
    the context, outside the loss, as it sits in a non-thinking generation prompt.
    """
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _render(tok, plain)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        needle = m["content"].strip()
        if not needle:
            continue
        start = text.find(needle, cursor)
        if start < 0:
            raise ValueError(
                f"messages[{i}].content does not appear verbatim in the chat template's rendering, so "
                "the assistant turns cannot be located for loss masking"
            )
        end = start + len(needle)
        if m["role"] == "assistant" and m["weight"]:
            through = _render(tok, plain[: i + 1])
            suffix = through[through.rfind(needle) + len(needle) :]
            end += _common_prefix_len(suffix, text[end : end + len(suffix)])
            spans.append((start, end))
        cursor = end
    return text, spans


def tokenize_example(tok: Tokenizer, ex: Example) -> TokenizedExample:
    """Tokenise one example and build its next-token targets (-100 outside assistant/completion)."""
    if ex.messages is not None:
        text, spans = _assistant_spans(tok, ex.messages)
        enc = tok.backend.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int64)
        # a token is trained on when it starts inside an assistant span
        starts = np.asarray([s for s, _ in enc.offsets], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:
            mask |= (starts >= lo) & (starts < hi)
    else:
        if tok.eos_token_id is None:
            raise ValueError("prompt/completion data needs a tokenizer with an eos token")
        assert ex.completion is not None, "an Example without messages has a completion (parse_line)"
        p = tok.encode(ex.prompt) if ex.prompt else []
        c = tok.encode(ex.completion) + [tok.eos_token_id]
        ids = np.asarray(p + c, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(p) :] = True
    targets = np.full(len(ids), IGNORE, dtype=np.int64)
    targets[:-1] = np.where(mask[1:], ids[1:], IGNORE)  # position t predicts token t+1
    return TokenizedExample(line=ex.line, input_ids=ids, targets=targets)


def tokenize_file(
    path: str | Path, tok: Tokenizer, seq_len: int
) -> tuple[list[TokenizedExample], dict[str, int]]:
    """Read, validate and tokenise ``path``; examples longer than ``seq_len`` are truncated.

    An example whose loss tokens all fall past ``seq_len`` is an error (its line is reported), since
    training on it would teach nothing. Returns (examples, stats).
    """
    examples = read_jsonl(path)
    out, errors, truncated = [], [], 0
    for ex in examples:
        try:
            t = tokenize_example(tok, ex)
        except ValueError as e:
            errors.append((ex.line, str(e)))
            continue
        if len(t.input_ids) > seq_len:
            truncated += 1
            t = TokenizedExample(t.line, t.input_ids[:seq_len], t.targets[:seq_len].copy(), truncated=True)
            t.targets[-1] = IGNORE  # its target lies past the cut
            if t.num_loss_tokens == 0:
                errors.append(
                    (ex.line, f"no assistant token within the first {seq_len} tokens (raise --seq-len)")
                )
                continue
        out.append(t)
    if errors:
        raise ChatDataError(path, errors)
    stats = {
        "examples": len(out),
        "truncated": truncated,
        "tokens": int(sum(len(t.input_ids) for t in out)),
        "loss_tokens": int(sum(t.num_loss_tokens for t in out)),
    }
    return out, stats


def split_heldout(
    examples: list[TokenizedExample], fraction: float, seed: int
) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """Deterministic (train, val) split holding out ``fraction`` of the examples (at least one)."""
    if len(examples) < 2:
        raise ValueError("need at least 2 examples to hold one out for validation (or pass --val-data)")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = max(1, int(round(len(examples) * fraction)))
    val = set(order[:n_val].tolist())
    return [e for i, e in enumerate(examples) if i not in val], [
        e for i, e in enumerate(examples) if i in val
    ]


def load_train_val(
    tok: Tokenizer,
    data: str | Path,
    val_data: str | Path | None,
    seq_len: int,
    val_fraction: float,
    seed: int,
) -> tuple[list[TokenizedExample], list[TokenizedExample], dict[str, Any]]:
    """Tokenise the training file and the validation file (or hold ``val_fraction`` of the training one out)."""
    train, _ = tokenize_file(data, tok, seq_len)
    if val_data:
        val, _ = tokenize_file(val_data, tok, seq_len)
        source = str(val_data)
    else:
        train, val = split_heldout(train, val_fraction, seed)
        source = f"{len(val)} examples held out of {data}"

    def summary(examples: list[TokenizedExample]) -> dict[str, int]:
        return {
            "examples": len(examples),
            "truncated_to_seq_len": sum(bool(e.truncated) for e in examples),
            "tokens": int(sum(len(e.input_ids) for e in examples)),
            "loss_tokens": int(sum(e.num_loss_tokens for e in examples)),
        }

    return train, val, {"train": summary(train), "val": summary(val), "val_source": source}


def length_bucketed_batches(
    examples: list[TokenizedExample], batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[int]]:
    """Group example indices into batches of similar length; deterministic in (seed, epoch).

    Examples are shuffled, stably sorted by length (so equal lengths stay in random order), cut into
    batches, and the batch order is shuffled: each batch pads little, and the run sees lengths mixed.
    """
    n = len(examples)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    lengths = np.asarray([len(examples[i].input_ids) for i in order])
    order = order[np.argsort(lengths, kind="stable")]
    batches = [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(
    examples: list[TokenizedExample], indices: list[int], pad_id: int, pad_multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch: input_ids (B, T) with ``pad_id``, targets (B, T) with -100; T is the longest
    example rounded up to a multiple of ``pad_multiple``."""
    length = max(len(examples[i].input_ids) for i in indices)
    length = -(-length // pad_multiple) * pad_multiple
    ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    tgt = torch.full((len(indices), length), IGNORE, dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(examples[i].input_ids)
        ids[row, :n] = torch.from_numpy(examples[i].input_ids)
        tgt[row, :n] = torch.from_numpy(examples[i].targets)
    return ids, tgt


def to_arrays(examples: list[TokenizedExample]) -> dict[str, np.ndarray]:
    """Flatten examples into three arrays (compact to ship to Ray Train workers)."""
    lengths = np.asarray([len(e.input_ids) for e in examples], dtype=np.int64)
    return {
        "input_ids": np.concatenate([e.input_ids for e in examples]).astype(np.int32),
        "targets": np.concatenate([e.targets for e in examples]).astype(np.int32),
        "lengths": lengths,
        "lines": np.asarray([e.line for e in examples], dtype=np.int64),
    }


def from_arrays(arrays: dict[str, np.ndarray]) -> list[TokenizedExample]:
    offsets = np.concatenate([[0], np.cumsum(arrays["lengths"])])
    return [
        TokenizedExample(
            line=int(arrays["lines"][i]),
            input_ids=arrays["input_ids"][offsets[i] : offsets[i + 1]].astype(np.int64),
            targets=arrays["targets"][offsets[i] : offsets[i + 1]].astype(np.int64),
        )
        for i in range(len(arrays["lengths"]))
    ]
