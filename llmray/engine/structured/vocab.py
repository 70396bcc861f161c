"""The bytes each token id stands for, for any tokenizer the engine loads.

Grammar masks are computed over bytes, so every token must be mapped back to the exact bytes it adds to the
output. Three encodings cover the tokenizers llmray writes and loads (``llmray.model.tokenizer``):

- byte-level BPE (GPT-2 / Qwen): token strings spell bytes through GPT-2's byte -> printable-char table;
- Metaspace / SentencePiece-style BPE: ``▁`` is a space and ``<0xNN>`` tokens are single bytes (byte fallback);
- everything else (char-level WordLevel, WordPiece without ``##``): the token string's UTF-8 bytes.

Special added tokens (eos, ChatML markers) map to ``b""``, which the grammar library treats as "never part of a
document"; non-special added tokens (``<think>``, ``<tool_call>``) keep their text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte table (the inverse of ``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder_types(node: dict[str, Any] | None) -> list[str]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [t for d in node.get("decoders", []) for t in _decoder_types(d)]
    return [node.get("type", "")]


@dataclass(frozen=True)
class Vocab:
    """Token bytes indexed by id (``len == vocab_size`` of the tokenizer), the kind, and the special ids."""

    tokens: list[bytes]
    kind: str  # "byte_level" | "metaspace" | "raw"
    special_ids: frozenset[int]

    def text_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.tokens[i] for i in ids if 0 <= i < len(self.tokens))


def vocab_kind(backend: Any) -> str:
    """Which encoding a ``tokenizers.Tokenizer`` uses for its token strings."""
    spec = json.loads(backend.to_str())
    decoders = _decoder_types(spec.get("decoder"))
    pre = json.dumps(spec.get("pre_tokenizer") or {})
    if "ByteLevel" in decoders:
        return "byte_level"
    if "Metaspace" in decoders or "ByteFallback" in decoders or '"Metaspace"' in pre:
        return "metaspace"
    return "raw"


def _token_to_bytes(token: str, kind: str) -> bytes:
    if kind == "byte_level":
        table = byte_decoder()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode("utf-8")  # an added token outside the byte alphabet (e.g. "<think>")
    if kind == "metaspace":
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        return token.replace("▁", " ").encode("utf-8")
    return token.encode("utf-8")


def build_vocab(tokenizer: Any) -> Vocab:
    """``tokenizer`` is an ``llmray.model.tokenizer.Tokenizer`` (or anything with a ``backend``
    ``tokenizers.Tokenizer``)."""
    backend = getattr(tokenizer, "backend", tokenizer)
    kind = vocab_kind(backend)
    by_id = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    size = max(by_id, default=-1) + 1
    added = backend.get_added_tokens_decoder()  # id -> AddedToken
    special = frozenset(i for i, t in added.items() if t.special)
    tokens = [b""] * size
    for i, tok in by_id.items():
        if i in special:
            continue
        if i in added:  # added tokens are matched as whole strings, never through the byte table
            tokens[i] = tok.encode("utf-8")
        else:
            tokens[i] = _token_to_bytes(tok, kind)
    return Vocab(tokens, kind, special)
