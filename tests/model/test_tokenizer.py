"""Tokenizers: round trips, transformers.AutoTokenizer compatibility, chat template, foreign tokenizer.json."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from llmray.model.tokenizer import Tokenizer, char_tokenizer, train_bpe

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20
SAMPLES = ["Hello, world!", "naïve café — 😀 ünïcödé", "  leading spaces\n\ttabs\n", ""]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "Hi."},
]


def test_char_tokenizer_round_trip_and_ids():
    tok = char_tokenizer(TEXT, special_tokens=False, base_chars="")
    chars = sorted(set(TEXT))
    assert tok.vocab_size == len(chars) and tok.eos_token_id is None
    ids = tok.encode("Speak, all.")
    assert ids == [chars.index(c) for c in "Speak, all."]
    assert tok.decode(ids) == "Speak, all."
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_bpe_round_trip_bytes_and_specials(tmp_path):
    tok = train_bpe([TEXT] * 3, vocab_size=320)
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    assert tok.eos_token_id is not None and tok.decode([tok.eos_token_id]) == ""
    assert tok.decode([tok.eos_token_id], skip_special_tokens=False) == "<|endoftext|>"
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(SAMPLES[1]) == tok.encode(SAMPLES[1]) and again.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_autotokenizer_loads_what_we_save(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = train_bpe([TEXT] * 3, vocab_size=320) if kind == "bpe" else char_tokenizer(TEXT + "😀ünïcödé—")
    tok.save(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for s in SAMPLES[:3]:
        if kind == "char" and set(s) - set(TEXT + "😀ünïcödé—"):
            continue
        assert auto.encode(s, add_special_tokens=False) == tok.encode(s)
        assert auto.decode(tok.encode(s)) == tok.decode(tok.encode(s))
    assert auto.eos_token_id == tok.eos_token_id
    for gen in (True, False):
        ours = tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=gen)
        theirs = auto.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=gen)
        assert ours == theirs
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False).count("<|im_start|>") == 3


def test_chat_template_tokenizes_special_tokens_as_one_id():
    tok = train_bpe([TEXT] * 3, vocab_size=320)
    ids = tok.apply_chat_template(MESSAGES[:2], tokenize=True)
    im_start = tok.backend.token_to_id("<|im_start|>")
    assert ids.count(im_start) == 3  # system, user, and the generation prompt


def test_loads_foreign_metaspace_and_wordlevel_tokenizers(tmp_path):
    # SentencePiece-style BPE (Metaspace pre-tokenizer + decoder), as Llama/Mistral ship it
    sp = HFTokenizer(
        models.BPE(vocab={"▁": 0, "h": 1, "i": 2, "▁h": 3, "▁hi": 4}, merges=[("▁", "h"), ("▁h", "i")])
    )
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    (tmp_path / "sp").mkdir()
    sp.save(str(tmp_path / "sp" / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "sp")
    assert tok.encode("hi hi") == [4, 4] and tok.decode([4, 4]) == "hi hi"
    wl = HFTokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    wl.normalizer = normalizers.Lowercase()
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.decoder = decoders.WordPiece()
    (tmp_path / "wl").mkdir()
    wl.save(str(tmp_path / "wl" / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "wl")
    assert tok.encode("Hello big World") == [1, 0, 2] and tok.decode([1, 2]) == "hello world"


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_char_vocab_always_holds_printable_ascii_and_newline():
    tok = char_tokenizer("abc")  # a corpus of three letters
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # ~!@$%^&*{}|\\\"'`\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.unknown_chars(text) == []


def test_unknown_characters_are_refused_by_name_never_replaced():
    from llmray.model.tokenizer import UnknownCharactersError

    tok = char_tokenizer("abc")
    with pytest.raises(UnknownCharactersError, match=r"'é' \(U\+00E9 LATIN SMALL LETTER E WITH ACUTE\)") as e:
        tok.encode("café<|im_end|>")
    assert e.value.chars == ["é"] and isinstance(e.value, ValueError)
    with pytest.raises(UnknownCharactersError, match="U\\+2014"):
        tok.encode_batch(["ok", "a — b"])
    assert tok.unknown_chars("x<|im_start|>y") == []  # special tokens are not characters
    assert (
        train_bpe([TEXT] * 3, vocab_size=320).unknown_chars("😀 ü") == []
    )  # byte-level BPE encodes anything
