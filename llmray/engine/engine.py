"""The engine core: ``step()`` = ``scheduler.schedule()`` -> ``runner.launch()`` / ``runner.collect()`` -> postprocess.

Single-threaded; ``LLM`` drives it in a loop and ``AsyncLLM`` from a background thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from llmray.config import EngineConfig
from llmray.engine.detokenizer import IncrementalDetokenizer
from llmray.engine.errors import RequestError
from llmray.engine.intake import encode_prompt, validate_request
from llmray.engine.outputs import RequestOutput
from llmray.engine.postprocess import RequestState, build_output, check_stop
from llmray.engine.runner import ModelRunner, PendingStep
from llmray.engine.sampling_params import SamplingParams
from llmray.engine.scheduler import Scheduler, SchedulerOutput
from llmray.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from llmray.engine.structured.spec import StructuredOutput
from llmray.lora.adapter import LoraAdapter

if TYPE_CHECKING:
    from llmray.lora.manager import LoraManager
    from llmray.model.qwen3 import Qwen3ForCausalLM


@dataclass
class _Step:
    sched: SchedulerOutput
    pending: PendingStep
    slots: list[int]  # index in seq.token_ids of each sampled token's placeholder


class LLMEngine:
    """Holds the model runner, the scheduler and the live requests."""

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        tokenizer: Any | None,
        config: EngineConfig,
        loras: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_config = model.config
        limit = model.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:  # rope tables end there
            raise ValueError(
                f"max_model_len {config.max_model_len} is longer than the model's {limit} positions "
                f"(max_position_embeddings); use at most {limit}"
            )
        self.max_model_len = config.max_model_len or limit
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        self.eos_token_id = eos if eos is not None else model.config.eos_token_id
        # a LoraManager when adapters are served (made before the runner: CUDA graphs capture it)
        self.lora: LoraManager | None = None
        if config.enable_lora or loras:
            from llmray.lora.manager import LoraManager

            max_rows = max(config.max_num_batched_tokens, config.max_num_seqs, 1)
            self.lora = LoraManager(
                model, model.config, config.max_loras, config.max_lora_rank, config.max_cpu_loras, max_rows
            )
            for name, path in (loras or {}).items():
                self.lora.add(name, path)
        self.runner = ModelRunner(model, config, self.max_model_len, self.eos_token_id, self.lora)
        self.scheduler = Scheduler(
            num_blocks=self.runner.num_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.scheduler.admit = self._admit if self.lora is not None else None
        self.requests: dict[str, RequestState] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.peak_blocks_used = 0
        self.async_scheduling = True  # overlap host work with the device step (tests switch it off)
        # constrained requests: launch the next forward ahead, sample it once this step is read back (False:
        # steps with constrained rows run synchronously; bench/structured.py compares both)
        self.defer_constrained_sampling = True
        self._inflight: _Step | None = None
        self.failed: list[tuple[str, str]] = []  # requests that failed alone (see _fail_request)
        self._failed_outputs: list[RequestOutput] = []
        self.stream_outputs = True  # False: step() returns finished requests only (offline LLM.generate)
        # the engine core process (llmray/engine/core.py) sets both: the front-end detokenizes and checks stop
        # strings, and step() returns one (request_id, token, finish_reason, stop_reason, logprobs) per token
        self.detokenize = True
        self.delta_outputs = False

    # --- requests -----------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        return self._encode(prompt)[0]

    def _encode(self, prompt: str | list[int]) -> tuple[list[int], np.ndarray]:
        """The prompt's ids, checked, as a list and an int64 array (the prefix cache hashes the array)."""
        return encode_prompt(prompt, self.tokenizer, self.model_config.vocab_size)

    def validate(self, prompt_ids: list[int], params: SamplingParams, lora: str | None = None) -> None:
        """RequestError for an unknown adapter, stop ids outside the vocabulary or a request too long."""
        validate_request(
            len(prompt_ids), params, lora, self.lora, self.model_config.vocab_size, self.scheduler
        )

    # --- LoRA adapters (call from the engine's thread) -------------------------------------------
    def add_lora(self, name: str, path: str | LoraAdapter) -> None:
        """Serve the adapter in directory ``path`` (or an already loaded one) as ``name``; replaces one of
        that name (requests running on the old one finish on it). AdapterError for a bad directory."""
        if self.lora is None:
            raise ValueError("this engine was started without LoRA support (enable_lora=True)")
        self.lora.register(path if isinstance(path, LoraAdapter) else self.lora.load(name, path))

    def remove_lora(self, name: str) -> None:
        """Stop serving ``name`` (KeyError if unknown); requests already running on it still complete."""
        if self.lora is None:
            raise KeyError(f"unknown LoRA adapter {name!r}")
        self.lora.remove(name)

    def list_loras(self) -> list[str]:
        return self.lora.names() if self.lora is not None else []

    def _admit(self, seq: Sequence) -> bool:
        """Scheduler hook: take a device slot for the sequence's adapter at its first admission.

        An adapter that cannot be loaded fails its request alone (the others are admitted)."""
        if seq.lora_adapter is None or seq.lora_slot >= 0:
            return True
        assert self.lora is not None, "a request with an adapter was validated against the LoraManager"
        try:
            if not self.lora.can_acquire(seq.lora_adapter):
                return False
            seq.lora_slot = self.lora.acquire(seq.lora_adapter)
        except Exception as e:
            self._fail_request(seq, f"its LoRA adapter {seq.lora_name!r} could not be loaded: {e!r}")
            return False
        return True

    def _fail_request(self, seq: Sequence, message: str) -> None:
        """End one request with finish_reason "error" (its own fault); the others go on.

        The request appears in ``self.failed`` ((request_id, message), drained by the caller) and, unless
        the engine emits deltas, as a finished output of the next ``step()``."""
        req = self.requests.pop(seq.request_id, None)
        if req is None:
            return
        self.scheduler.finish(seq, "error")
        self._release(seq)
        req.stop_reason = message
        self.failed.append((seq.request_id, message))
        if not self.delta_outputs:
            self._failed_outputs.append(build_output(req))

    def pop_failed(self) -> list[tuple[str, str]]:
        """(request_id, message) of the requests that failed alone since the last call."""
        out, self.failed = self.failed, []
        return out

    def _release(self, seq: Sequence) -> None:
        self.runner.release(seq)
        if seq.lora_slot >= 0:
            assert self.lora is not None, "a sequence holds a LoRA slot only when adapters are served"
            self.lora.release(seq.lora_slot)
            seq.lora_slot = -1

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        lora: str | None = None,
    ) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        ids, view = self._encode(prompt)
        self.validate(ids, params, lora)
        constraint = self._constraint(params) if params.structured_output is not None else None
        adapter: LoraAdapter | None = None
        adapter_id = 0
        if lora is not None:
            assert self.lora is not None, "validate() rejects an adapter when LoRA is off"
            adapter, adapter_id = self.lora.get(lora), self.lora.id_of(lora)
        seq = Sequence(request_id, ids, params, adapter_id, lora_name=lora, lora_adapter=adapter)
        seq.constraint = constraint
        seq.prompt_array = view
        self.scheduler.add(seq)
        lazy = not self.stream_outputs  # (and no stop strings: the text is decoded when read, not per token)
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop, lazy) if self.detokenize else None
        self.requests[request_id] = RequestState(seq, detok, [] if params.logprobs is not None else None)
        self.prompt_tokens_total += len(ids)

    def _constraint(self, params: SamplingParams) -> Any:
        """Structured outputs: the request's grammar constraint (``llmray.engine.structured``: xgrammar,
        compiled once per tokenizer at the first constrained request, cached by spec). RequestError for a
        spec that cannot be compiled."""
        if getattr(self, "_grammars", None) is None:
            from llmray.engine.structured.compiler import GrammarCompiler

            self._grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_id)
        spec = params.structured_output
        assert isinstance(spec, StructuredOutput), "SamplingParams.__post_init__ parses the spec"
        try:
            return self._grammars.constraint(spec, params.stop_token_ids)
        except ValueError as e:
            raise RequestError(str(e), "structured_output") from None

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req.seq, "abort")
        self._release(req.seq)
        return build_output(req)

    def abort_all(self) -> list[str]:
        """Abort every request and drop a launched step (after a failed step); returns their ids."""
        self._inflight = None
        ids = list(self.requests)
        for request_id in ids:
            self.abort(request_id)
        return ids

    # --- one step -----------------------------------------------------------------------------
    # With ``async_scheduling`` the next step is scheduled and launched before the current one is read back,
    # so the host work (scheduling, inputs, postprocessing) overlaps the GPU. The next step's input for a
    # sequence that samples now is a PLACEHOLDER token id, replaced on the device by the sampled token;
    # a sequence that turns out to have finished just has its speculative token discarded.
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def step(self) -> list[RequestOutput]:
        """Run one step; returns an output for every request that got a token (only finished ones if
        ``stream_outputs`` is False: building outputs copies each request's tokens)."""
        current = self._inflight if self._inflight is not None else self._launch()
        self._inflight = None
        failed, self._failed_outputs = self._failed_outputs, []
        if current is None:
            return failed
        # penalties read the output tokens on the host: steps holding such requests run synchronously (no
        # launch ahead). Constraints need the last token accepted to fill their mask: the next step's forward
        # is launched ahead, its sampling queued once this step is read back (structured outputs keep the
        # overlap of the forward with the host's read-back and mask filling)
        running = self.scheduler.running
        constrained = any(s.constraint is not None for s in running)
        if (
            self.async_scheduling
            and not any(s.sampling_params.has_penalties for s in running)
            and (self.defer_constrained_sampling or not constrained)
        ):
            self._inflight = self._launch(defer_sampling=constrained)
        outputs = failed + self._read_back(current)
        if self._inflight is not None and self._inflight.pending.logits is not None:
            self.runner.sample(self._inflight.pending)
        return outputs

    def _launch(self, defer_sampling: bool = False) -> _Step | None:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return None
        pending = self.runner.launch(sched.scheduled, defer_sampling)
        self.scheduler.advance(sched)
        # the blocks of requests that finished since the last launch are released now, while the device runs
        # this step (not on those requests' latency)
        bm = self.scheduler.block_manager
        bm.release_deferred()
        self.peak_blocks_used = max(
            self.peak_blocks_used, bm.num_blocks - len(bm.free_empty) - len(bm.free_cached)
        )
        slots = []
        for seq in pending.seqs:
            tokens = seq.token_ids
            slots.append(len(tokens))
            tokens.append(PLACEHOLDER)
        return _Step(sched, pending, slots)

    def _read_back(self, step: _Step) -> list[RequestOutput]:
        pending = step.pending
        tokens, lps = self.runner.collect(pending)
        # constrained rows whose token the mask worker accepted already: row -> the tokens that end them
        consumed = self.runner.masks.consumed(pending) or {}
        failed = pending.failed
        requests = self.requests
        delta, stream = self.delta_outputs, self.stream_outputs
        eos, max_len, detok_on = self.eos_token_id, self.max_model_len, self.tokenizer is not None
        outputs: list[Any] = []  # RequestOutputs, or (id, token, finish, stop, logprobs) when delta_outputs
        known = 0
        for r, (seq, slot, token) in enumerate(zip(pending.seqs, step.slots, tokens, strict=True)):
            if seq.status is SequenceStatus.FINISHED:
                continue  # aborted, or finished by an earlier token: a speculative token, discarded
            if failed and r in failed:
                del seq.token_ids[slot:]
                self._fail_request(seq, failed[r])
                outputs.extend(self._failed_outputs)
                self._failed_outputs = []
                continue
            seq.token_ids[slot] = token
            req = requests[seq.request_id]
            req.num_known += 1
            known += 1
            lp = lps[r] if lps is not None else None
            if req.logprobs is not None and lp is not None:
                req.logprobs.append(lp)
            try:
                ends = consumed.get(r)
                if ends is not None:
                    done = "stop" if token in ends else None
                else:
                    done = self._check_constraint(seq, token) if seq.constraint is not None else None
                reason = check_stop(req, token, eos, max_len, detok_on) or done
            except Exception as e:  # this request's stop check or constraint broke: it fails alone
                del seq.token_ids[slot + 1 :]
                self._fail_request(seq, f"processing its output failed: {e!r}")
                outputs.extend(self._failed_outputs)
                self._failed_outputs = []
                continue
            if reason is not None:
                del seq.token_ids[slot + 1 :]  # a token sampled after this one is in flight: drop it
                self.scheduler.finish(seq, reason)
                self._release(seq)
                del requests[seq.request_id]
            if delta:
                outputs.append((seq.request_id, token, reason, req.stop_reason, lp))
            elif reason is not None or stream:
                outputs.append(build_output(req))
        self.generation_tokens_total += known
        self.scheduler.cache_blocks(step.sched)
        return outputs

    def _check_constraint(self, seq: Sequence, token: int) -> str | None:
        """Constrained decoding: the constraint takes the token; "stop" once its grammar is complete."""
        constraint = seq.constraint
        assert constraint is not None, "called for constrained sequences only"
        if not constraint.accept_token(token):
            raise ValueError(f"its token constraint rejected the sampled token {token}")
        return "stop" if constraint.is_terminated() else None

    def stats(self) -> dict[str, Any]:
        bm = self.scheduler.block_manager
        # idle: release the finished requests' blocks (else the next launch does)
        if not self.has_unfinished():
            bm.release_deferred()
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": bm.usage,
            "num_free_blocks": bm.num_free_blocks,
            "num_total_blocks": bm.num_blocks,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "num_loras": len(self.lora.paths) if self.lora is not None else 0,
        }
