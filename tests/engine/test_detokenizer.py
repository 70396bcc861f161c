"""Incremental detokenization: multi-byte characters are never cut, stop strings never leak."""

from __future__ import annotations

from llmray.engine.detokenizer import IncrementalDetokenizer
from llmray.model.tokenizer import train_bpe

TEXT = "héllo wörld, 日本語 and emoji 🎉 ok. stop here please"


def _tok():
    return train_bpe(["plain ascii words only " * 20], vocab_size=300)  # non-ASCII stays split into bytes


def test_byte_pieces_are_held_until_a_character_is_complete():
    tok = _tok()
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT.encode()) // 2  # multi-byte chars span several tokens
    d = IncrementalDetokenizer(tok, tok.encode("prompt:"), stop=[])
    deltas = []
    for t in ids:
        d.update([t])
        deltas.append(d.delta(finished=False))
    deltas.append(d.delta(finished=True))
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == TEXT == d.text


def test_stop_string_across_tokens_is_cut_and_never_streamed():
    tok = _tok()
    d = IncrementalDetokenizer(tok, [1], stop=["stop here"])
    streamed, found = "", None
    for t in tok.encode(TEXT):
        found = d.update([t])
        streamed += d.delta(finished=found is not None)
        if found:
            break
    assert found == "stop here"
    assert streamed == d.text == TEXT[: TEXT.index("stop here")]
