"""Per-request bookkeeping after a step's read-back: the request's state, its stop checks, its outputs.

``LLMEngine._read_back`` writes each sampled token into its sequence, then asks ``check_stop`` whether the
request is done and ``build_output`` for what to hand out (token ids, text, finish/stop reason, logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmray.engine.detokenizer import IncrementalDetokenizer
from llmray.engine.outputs import RequestOutput
from llmray.engine.sequence import Sequence


@dataclass(eq=False)
class RequestState:
    seq: Sequence
    detok: IncrementalDetokenizer | None  # None in the core process (the front-end detokenizes)
    logprobs: list[dict[int, float]] | None
    num_known: int = 0  # output tokens read back (later ones may be placeholders of a step in flight)
    num_reported: int = 0  # output tokens already handed out
    stop_reason: str | int | None = None


def check_stop(
    req: RequestState, token: int, eos_token_id: int | None, max_model_len: int, detokenize: bool
) -> str | None:
    """The finish reason after ``token`` ("stop", "length") or None; sets ``req.stop_reason`` for a stop
    token id or stop string (stop strings need the detokenizer: front-ends check them in the core's case)."""
    seq = req.seq
    p = seq.sampling_params
    n = req.num_known
    stop_str = req.detok.update([token]) if detokenize and req.detok is not None else None
    if n >= p.min_tokens:
        if p.stop_token_ids and token in p.stop_token_ids:
            req.stop_reason = token
            return "stop"
        if token == eos_token_id and not p.ignore_eos:
            return "stop"
        if stop_str is not None:
            req.stop_reason = stop_str
            return "stop"
    if n >= p.max_tokens or len(seq.prompt_token_ids) + n >= max_model_len:
        return "length"
    return None


def build_output(req: RequestState) -> RequestOutput:
    """The request's output so far (cumulative ids and text, plus what is new since the last one)."""
    seq = req.seq
    out_ids = seq.token_ids[seq.num_prompt_tokens : seq.num_prompt_tokens + req.num_known]
    new = out_ids[req.num_reported :]
    req.num_reported = len(out_ids)
    finished = seq.finish_reason is not None
    return RequestOutput(
        request_id=seq.request_id,
        prompt_token_ids=seq.prompt_token_ids,
        token_ids=out_ids,
        text=req.detok.text if req.detok is not None else "",
        finish_reason=seq.finish_reason,
        logprobs=list(req.logprobs) if req.logprobs is not None else None,
        num_cached_tokens=seq.num_cached_tokens,
        new_token_ids=new,
        new_text=req.detok.delta(finished) if req.detok is not None else "",
        stop_reason=req.stop_reason,
    )
