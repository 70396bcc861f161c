"""Tokenizers built on the ``tokenizers`` library, saved so ``transformers.AutoTokenizer`` loads them unchanged.

Two trainable kinds: char-level (WordLevel over single characters, nanoGPT's shakespeare_char) and
byte-level BPE (GPT-2/Qwen style). ``Tokenizer.load`` also reads any Hugging Face ``tokenizer.json``
(byte-level BPE, Metaspace/SentencePiece-style BPE, WordLevel); decoding always goes through the library.
A ChatML chat template (``<|im_start|>`` / ``<|im_end|>``) is saved in ``tokenizer_config.json`` and rendered
with jinja2 exactly as transformers renders it.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

EOS_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]
# every char vocabulary holds these, whatever its corpus: ordinary English and code always encode
BASE_CHARS = "".join(map(chr, range(32, 127))) + "\n\t"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3-style: ChatML plus tools (a system block listing them; assistant ``<tool_call>`` blocks; tool results
# as ``<tool_response>`` user turns) and thinking (``enable_thinking=False`` writes an empty think block).
# Without tools or thinking it renders exactly as CHATML_TEMPLATE. The default for tokenizers we write.
QWEN3_STYLE_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n\' }}'
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}"
    "{%- if message.reasoning_content %}"
    "{{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' }}{%- endif %}"
    "{{- message.content or '' }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- if message.content or not loop.first %}{{- '\n' }}{%- endif %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    '{{- \'<tool_call>\n{"name": "\' + fn.name + \'", "arguments": \' }}'
    "{%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}"
    "{{- '}\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}"
    "{%- endif %}{%- endif %}"
)


class UnknownCharactersError(ValueError):
    """Text holds characters a char-level (WordLevel) vocabulary lacks; ``chars`` names them."""

    def __init__(self, chars: list[str], where: str = "the text") -> None:
        self.chars = chars
        super().__init__(f"{where} holds characters the tokenizer cannot encode: {describe_chars(chars)}")


def describe_chars(chars: Sequence[str], limit: int = 8) -> str:
    """``'é' (U+00E9 LATIN SMALL LETTER E WITH ACUTE), ...`` for error messages."""
    parts = [f"{c!r} (U+{ord(c):04X} {unicodedata.name(c, '?')})" for c in list(chars)[:limit]]
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return ", ".join(parts) + more


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special tokens and chat template of ``tokenizer_config.json``."""

    def __init__(self, backend: HFTokenizer, config: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self.config.setdefault("chat_template", QWEN3_STYLE_TEMPLATE)

    # --- special tokens -------------------------------------------------------------------------
    def _special_id(self, key: str) -> int | None:
        tok = _token_str(self.config.get(key))
        return None if tok is None else self.backend.token_to_id(tok)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        pad = self._special_id("pad_token")
        return self.eos_token_id if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str:
        return self.config["chat_template"]

    @property
    def is_char_level(self) -> bool:
        """A WordLevel vocabulary without an unknown token (``char_tokenizer``): some text cannot encode."""
        if not hasattr(self, "_char_level"):
            model = json.loads(self.backend.to_str())["model"]
            unk = model.get("unk_token")  # WordLevel(unk_token=None) saves "<unk>" without such a token
            self._char_level = model.get("type") == "WordLevel" and (not unk or unk not in model["vocab"])
        return self._char_level

    def unknown_chars(self, text: str) -> list[str]:
        """Characters of ``text`` this tokenizer cannot encode (sorted; always empty for byte-level BPE)."""
        if not self.is_char_level:
            return []
        for tok in self.backend.get_added_tokens_decoder().values():
            text = text.replace(tok.content, "")
        vocab = self.backend.get_vocab(with_added_tokens=False)
        return sorted(c for c in set(text) if c not in vocab)

    # --- encode / decode ------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``UnknownCharactersError`` names characters a char vocabulary lacks."""
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception:
            unknown = self.unknown_chars(text)
            if unknown:
                raise UnknownCharactersError(unknown) from None
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        try:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        except Exception:
            unknown = self.unknown_chars("".join(texts))
            if unknown:
                raise UnknownCharactersError(unknown) from None
            raise

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the chat template (jinja2 sandbox, as transformers does); ``tools`` and
        ``template_kwargs`` (e.g. ``enable_thinking=False``) are template variables, as in transformers."""
        variables = {**template_kwargs, "tools": tools}
        text = _render_template(self.chat_template, messages, add_generation_prompt, self.config, variables)
        return self.encode(text) if tokenize else text

    # --- persistence ----------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.config.get("model_max_length", 131072),
            **{k: v for k, v in self.config.items() if k not in ("tokenizer_class",)},
        }
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        specials = {k: cfg[k] for k in ("eos_token", "bos_token", "pad_token") if cfg.get(k) is not None}
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, model_dir: str | Path) -> Tokenizer:
        path = Path(model_dir)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise FileNotFoundError(
                f"{tok_file} not found: a model directory needs a tokenizer.json (Hugging Face tokenizers format)"
            )
        config: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.exists():
            config = json.loads(cfg_file.read_text())
        template_file = path / "chat_template.jinja"
        if "chat_template" not in config and template_file.exists():
            config["chat_template"] = template_file.read_text()
        for key in ("added_tokens_decoder", "auto_map"):
            config.pop(key, None)
        return cls(HFTokenizer.from_file(str(tok_file)), config)


def _render_template(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    config: dict[str, Any],
    variables: dict[str, Any] | None = None,
) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    specials = {k: _token_str(config.get(k)) for k in ("eos_token", "bos_token", "pad_token")}
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **{**(variables or {}), **specials}
    )


def _with_specials(backend: HFTokenizer, eos: bool) -> dict[str, Any]:
    backend.add_special_tokens(SPECIAL_TOKENS)
    return {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN} if eos else {}


def char_tokenizer(text: str, special_tokens: bool = True, base_chars: str = BASE_CHARS) -> Tokenizer:
    """One token per distinct character of ``text`` and ``base_chars`` (sorted character order, as nanoGPT).

    ``base_chars`` (printable ASCII, newline and tab) are always in the vocabulary, so ordinary English and
    code encode whatever the corpus; any other character the corpus lacks is refused by ``encode`` (never
    replaced by an unknown token). With ``special_tokens`` the ChatML/eos tokens follow the characters.
    """
    chars = sorted(set(text) | set(base_chars))
    if not chars:
        raise ValueError("cannot build a char tokenizer from empty text")
    backend = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    config = _with_specials(backend, eos=True) if special_tokens else {}
    return Tokenizer(backend, config)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer (with eos and ChatML special tokens) on ``texts``."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE (needs >= 259)")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN})
