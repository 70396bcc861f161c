"""One request's tokens and bookkeeping as the scheduler, block manager and runner see it."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from llmray.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import numpy as np
    import torch

    from llmray.lora.adapter import LoraAdapter

_seq_counter = itertools.count()

PLACEHOLDER = -1  # a token sampled by a step still in flight (async scheduling); filled in when read back


@runtime_checkable
class TokenConstraint(Protocol):
    """Constrained decoding (structured outputs): which tokens a request may sample next.

    The engine calls, for a request whose ``Sequence.constraint`` is set: ``fill_bitmask`` before each step
    that samples it (its previous token already accepted), ``accept_token`` with each sampled token once
    read back (False: the request fails alone), and ``is_terminated`` after it (True: it finishes "stop").
    """

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write row ``row`` of ``bitmask`` (int32 (rows, ceil(vocab/32)), host; bit t%32 of word t//32 set =
        token t allowed). The row arrives all ones (every token allowed)."""
        ...

    def accept_token(self, token_id: int) -> bool: ...

    def is_terminated(self) -> bool: ...


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted (blocks freed; recomputed on resume)
    RUNNING = "running"  # holds KV blocks; scheduled each step until it finishes
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Prompt + generated tokens, the KV block table, and how many tokens the cache already holds.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache. A sequence with all but its last token
    computed is decoding; anything else is (re)filling its prompt in chunks.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    adapter_id: int = 0  # LoRA adapter's stable id; 0 = the base model. Part of the prefix-cache hash.
    lora_name: str | None = None  # adapter this request runs on (None = the base model)
    lora_adapter: LoraAdapter | None = None  # the version current when the request was accepted
    lora_slot: int = -1  # device slot holding its adapter, taken at first admission; -1 = none
    seq_id: int = field(default_factory=lambda: next(_seq_counter))  # arrival order
    token_ids: list[int] = field(init=False)  # prompt + output
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash chain over the full blocks of token_ids
    num_registered_blocks: int = 0  # leading blocks of block_table already in the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    constraint: TokenConstraint | None = None  # constrained decoding (set by the engine at add_request)
    # the runner's bookkeeping (step_inputs.py): this sequence's row in the persistent host block table,
    # the block_table list object that row mirrors and how many of its entries are written there, and the
    # row of prev_tokens holding the token sampled for it by the latest launch (fills its placeholder)
    table_row: int = field(default=-1, repr=False)
    table_list: list[int] | None = field(default=None, repr=False)
    table_len: int = field(default=0, repr=False)
    sample_row: int = field(default=-1, repr=False)
    # the prompt's ids as an int64 array (the engine's encode makes it), for the prefix cache's hashing
    prompt_array: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a prompt must hold at least one token")
        if type(self.prompt_token_ids) is not list:  # (a list is taken as is: the engine passes a fresh one)
            self.prompt_token_ids = list(self.prompt_token_ids)
        self.token_ids = self.prompt_token_ids.copy()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        return self.num_uncomputed_tokens == 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
