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


def test_a_batch_ending_inside_a_character_keeps_the_text_before_it():
    # a stream front-end hands over every token since its last read at once; when that batch ends inside a
    # multi-byte character, the complete text before it is emitted now (was: the whole batch held back, and
    # lost for good when the request ended there: a slow reader of a stream got a fraction of its text)
    tok = _tok()
    ids = tok.encode(TEXT)
    one, batched = IncrementalDetokenizer(tok, [1], stop=[]), IncrementalDetokenizer(tok, [1], stop=[])
    cut = next(i for i in range(2, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    for t in ids[:cut]:
        one.update([t])
    batched.update(ids[:cut])
    assert batched.text == one.text == tok.decode(ids[:cut]).rstrip("\ufffd") != ""
    for size in (3, 7):
        d, streamed = IncrementalDetokenizer(tok, [1], stop=[]), ""
        for i in range(0, len(ids), size):
            d.update(ids[i : i + size])
            streamed += d.delta(finished=False)
        assert streamed + d.delta(finished=True) == TEXT


def test_lazy_text_equals_the_eager_text():
    # LLM.generate's requests without stop strings decode when the text is read, not per token: the same text
    # for any ids (random ones too: bytes of multi-byte characters, invalid sequences), read at any time
    import random

    tok = _tok()
    rng = random.Random(0)
    texts = [TEXT] + ["".join(rng.choice("aé日🎉 x") for _ in range(30)) for _ in range(5)]
    runs = [tok.encode(t) for t in texts] + [
        [rng.randrange(tok.vocab_size) for _ in range(40)] for _ in range(20)
    ]
    for ids in runs:
        eager, lazy = (
            IncrementalDetokenizer(tok, [1, 2], []),
            IncrementalDetokenizer(tok, [1, 2], [], lazy=True),
        )
        streamed = ""
        for i, t in enumerate(ids):
            assert eager.update([t]) is None and lazy.update([t]) is None
            if i % 7 == 3:  # a read in between (a stream toggled on later) catches up
                assert lazy.text == eager.text
                streamed += lazy.delta(finished=False)
        assert lazy.text == eager.text
        assert streamed + lazy.delta(finished=True) == eager.text
    assert not IncrementalDetokenizer(tok, [1], ["stop"], lazy=True).lazy  # stop strings need every token
