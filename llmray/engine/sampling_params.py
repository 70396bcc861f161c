"""Per-request sampling settings (the names and defaults follow vLLM's ``SamplingParams``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmray.engine.errors import RequestError
from llmray.engine.structured.spec import StructuredOutput


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. Validated on construction (ValueError names the field)."""

    max_tokens: int = 16  # new tokens at most
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens exist
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept (1 = off)
    top_k: int = 0  # most likely tokens kept (0 = off)
    min_p: float = 0.0  # drop tokens below min_p * p(most likely) (0 = off)
    seed: int | None = None  # per-request generator: the same tokens whatever shares the batch
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens (kept in token_ids)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    presence_penalty: float = 0.0  # OpenAI semantics: subtract once per token already generated
    frequency_penalty: float = 0.0  # subtract count * penalty
    repetition_penalty: float = 1.0  # CTRL/HF semantics over prompt + output tokens (1 = off)
    logprobs: int | None = None  # top-n logprobs per generated token (0 = the chosen token only)
    # constrained decoding: a StructuredOutput (or its dict, e.g. {"json": schema}); see llmray.engine.structured
    structured_output: StructuredOutput | dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("min_tokens", isinstance(self.min_tokens, int) and 0 <= self.min_tokens, "an integer >= 0"),
            ("temperature", self.temperature >= 0.0, ">= 0 (0 means greedy)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "> 0 (1 = off)"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "None or an integer in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
            (
                "stop_token_ids",
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "token ids >= 0",
            ),
            (
                "seed",
                self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64),
                "None or an integer in [-2**63, 2**64)",
            ),
        ]
        for name, ok, what in checks:
            if not ok:
                raise RequestError(f"SamplingParams.{name} must be {what}, got {getattr(self, name)!r}", name)
        if self.min_tokens > self.max_tokens:
            raise RequestError(
                f"SamplingParams.min_tokens={self.min_tokens} must not exceed max_tokens={self.max_tokens}",
                "min_tokens",
            )
        if self.structured_output is not None:
            try:
                self.structured_output = StructuredOutput.from_dict(self.structured_output)
            except ValueError as e:
                raise RequestError(f"SamplingParams.{e}", "structured_output") from None

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 sample greedily (as vLLM): dividing by them overflows float32."""
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
