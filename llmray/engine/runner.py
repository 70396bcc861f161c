"""The only engine code that touches the device: one step = inputs -> forward (graph or eager) -> sampler.

``launch(scheduled)`` builds the step's packed inputs into pinned memory and moves them with one copy
(step_inputs.py), replays a CUDA graph for decode-only steps and for mixed steps up to
``max_graph_tokens`` tokens (cuda_graphs.py) or runs the model eagerly, samples on the device, and
returns without waiting; ``collect`` reads the sampled tokens back: the step's single host sync. The KV
cache (sizing, fp8) lives in kv_cache.py. Constrained rows get their token bitmask here (one host->device
copy, applied in the sampler); a failure that belongs to one request (its constraint, its sampling state)
is reported for that request alone. ``warmup`` runs at start-up so that no Triton kernel compiles and no
CUDA graph is captured while serving.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from llmray.config import EngineConfig
from llmray.engine.attention_metadata import PagedAttentionMetadata
from llmray.engine.cuda_graphs import CudaGraphs, decode_buckets
from llmray.engine.kv_cache import KVCache
from llmray.engine.sampler import Bitmask, Sampler, SamplerOutput
from llmray.engine.scheduler import ScheduledSeq
from llmray.engine.sequence import Sequence
from llmray.engine.step_inputs import Layout, StepBatch, StepInputs, tile_capacity
from llmray.engine.structured.step_masks import StepMasks
from llmray.engine.warmup import warmup
from llmray.kernels._common import num_sms
from llmray.kernels.paged_attention import default_num_splits, prefill_block_m

# steps of at most PREFILL_SPLIT_TOKENS tokens have few prefill tiles (a 48-token chunk after a 2,000-token
# cached prefix: one per head); their keys are split over PREFILL_SPLITS programs (merged after)
PREFILL_SPLITS, PREFILL_SPLIT_TOKENS = 8, 256
FUSE_KV_STORE = True  # (read by ModelRunner(): benches A/B it)
# one sequence's chunk without decode rows, up to this many tokens, replays a "prefill" graph (no decode
# kernel, a one-sequence tile list)
PREFILL_GRAPH_TOKENS = 256
logger = logging.getLogger("llmray.engine")


@dataclass
class PendingStep:
    indices: list[int]  # positions in the scheduled list of the chunks that sample
    seqs: list[Sequence]
    out: SamplerOutput | None  # device tensors, not read yet
    failed: dict[int, str] = field(default_factory=dict)  # sampling row -> why that request failed
    # CUDA: the results copied (non-blocking) into pinned host memory, and an event after the copies, so
    # that collecting this step waits for this step only, not for the next one launched behind it
    host: SamplerOutput | None = None
    ready: torch.cuda.Event | None = None
    # launched with defer_sampling: the logits wait for ``sample`` (constrained rows need the previous
    # step's tokens accepted before their masks can be filled)
    logits: torch.Tensor | None = None


class ModelRunner:
    def __init__(
        self, model, config: EngineConfig, max_model_len: int, eos_token_id: int | None, lora=None
    ) -> None:
        self.model = model
        self.lora_batch = lora.batch if lora is not None else None  # per-row adapter slots (LoraManager)
        if hasattr(model, "fuse_projections"):  # with LoRA too: its groups add deltas to the fused outputs
            model.fuse_projections()  # q/k/v and gate/up as one GEMM each (before the cache takes the memory)
        self.config = config
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.cache = KVCache(model, config, max_model_len)
        self.device, self.dtype = self.cache.device, self.cache.model_dtype
        self.num_blocks, self.block_size = self.cache.num_blocks, config.block_size
        self.max_blocks_per_seq = self.cache.max_blocks_per_seq
        self.scale = model.config.head_dim**-0.5
        self.vocab_size = model.config.vocab_size
        self.is_cuda = self.device.type == "cuda"
        self.use_triton = self.is_cuda  # tests set it on CPU under TRITON_INTERPRET=1
        # split-K programs per prefill tile in small steps (CPU interpreter tests: 1 unless a test sets it)
        self.prefill_splits = PREFILL_SPLITS if self.is_cuda else 1
        # the model's q/k norm + rope also stores k/v in the cache (one launch less per layer; Triton only)
        self.fuse_kv_store = FUSE_KV_STORE
        self.num_sms = num_sms(self.device) if self.is_cuda else 1
        self.block_m = prefill_block_m(self.dtype)
        self.buckets = decode_buckets(config.max_num_seqs)
        # a step (graphs included: mixed buckets stop at the budget, hold <= max_num_seqs sequences) fits
        tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
        seqs = config.max_num_seqs
        capacity = 5 * tokens + 3 * seqs + 2 * tile_capacity(tokens, seqs, self.block_m) + 24
        capacity += seqs * (self.max_blocks_per_seq + 1)
        self.inputs = StepInputs(
            self.device, capacity, config.block_size, self.block_m, self.max_blocks_per_seq
        )
        self.sampler = Sampler(self.device, config.seed)
        # constrained rows' masks (structured/step_masks.py); a deferred step waiting for its sampling
        self.masks = StepMasks(self.device, self.vocab_size, seqs)
        self._unsampled: PendingStep | None = None
        self._sampled: PendingStep | None = None  # the latest step that sampled (its tokens: next masks)
        # the latest launch's samples; seq.sample_row is each sampling sequence's row here
        self.prev_tokens = torch.zeros(seqs, dtype=torch.long, device=self.device)
        self._out_bufs = [
            torch.zeros(seqs, dtype=torch.long, pin_memory=self.is_cuda) for _ in range(2)
        ]  # pinned landing buffers of the sampled tokens (CUDA)
        self._lp_bufs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]  # ... of logprobs
        self._out_turn = 0
        self._cuda_graphs: CudaGraphs | None = None
        self.graphs: dict = {}
        if self.is_cuda:  # enforce_eager: the same padded steps, run eagerly (the same tokens either way)
            self._cuda_graphs = CudaGraphs(
                self._forward,
                self.inputs.dev,
                config.max_num_seqs,
                self.max_blocks_per_seq,
                config.max_graph_tokens,
                config.max_num_batched_tokens,
                self.block_m,
                self.lora_batch is not None,
                PREFILL_GRAPH_TOKENS,
            )
            if not config.enforce_eager:
                self._cuda_graphs.capture()
            self.graphs = self._cuda_graphs.graphs
        self.warmup_s = warmup(self) if self.is_cuda else 0.0

    # kept for callers that read the cache through the runner
    @property
    def kv_cache(self) -> torch.Tensor:
        return self.cache.kv_cache

    @property
    def block_bytes(self) -> int:
        return self.cache.block_bytes

    def release(self, seq: Sequence) -> None:
        """Forget a finished sequence's sampler state and block-table row."""
        self.sampler.release(seq)
        self.inputs.rows.release(seq)

    def _splits(self, rows: int) -> int:
        if not self.is_cuda:
            return 2
        bucket = next((b for b in self.buckets if b >= rows), rows)
        return default_num_splits(bucket, self.cache.num_kv_heads, self.num_sms, fp8=self.cache.fp8)

    def _set_lora_enabled(self, enabled: bool) -> None:
        if self.lora_batch is not None:
            self.lora_batch.enabled = enabled

    def _forward(
        self,
        views: dict,
        tables: torch.Tensor,
        layout: Layout,
        kind: str,
        with_lora: bool,
        decode_rows: int | None = None,
        placeholders: bool = True,
    ) -> torch.Tensor:
        """The model over a step's inputs (graph-capturable): hidden states (T, hidden).

        kind "decode" | "mixed" (graphs: the decode kernel over every sequence slot) | "prefill" (no decode
        rows) or "eager"."""
        ids = views["ids"]
        if placeholders:
            ids = torch.where(ids < 0, self.prev_tokens[views["src"]], ids)
        self._set_lora_enabled(with_lora)
        if with_lora:
            assert self.lora_batch is not None, "with_lora is set only when the runner serves adapters"
            self.lora_batch.set_rows(views["lora"])
        if kind == "prefill":
            decode_rows = 0
        decode_rows = layout.seqs if decode_rows is None else decode_rows
        with_tiles = kind in ("mixed", "prefill") or (kind == "eager" and layout.tiles > 0)
        meta = PagedAttentionMetadata(
            k_cache=self.cache.k_cache,
            v_cache=self.cache.v_cache,
            slot_mapping=views["slots"],
            block_tables=tables,
            query_start=views["qstart"],
            context_lens=views["ctx"],
            decode_rows=decode_rows,
            tiles=(views["tile_seq"], views["tile_m"]) if with_tiles else None,
            scale=self.scale,
            num_splits=self._splits(decode_rows or 1),
            prefill_splits=self.prefill_splits if layout.tokens <= PREFILL_SPLIT_TOKENS else 1,
            use_triton=self.use_triton,
            k_scales=self.cache.k_scales,
            v_scales=self.cache.v_scales,
            decode_direct=kind not in ("mixed", "prefill"),
            fuse_store=self.fuse_kv_store,
        )
        return self.model.hidden_states(ids[None], views["pos"][None], meta)[0]

    # --- one step -----------------------------------------------------------------------------------
    def _run_model(self, items: list[ScheduledSeq], sample_rows: list[int]) -> tuple[StepBatch, torch.Tensor]:
        num_tokens = sum(it.num_new_tokens for it in items)
        use_lora = self.lora_batch is not None and any(it.seq.lora_slot >= 0 for it in items)
        all_decode = items[-1].num_new_tokens == 1
        no_decode = items[0].num_new_tokens != 1  # (one-token chunks come first)
        if no_decode and len(items) == 1:  # prefill graphs take no placeholder (a suffix: the last token)
            it = items[0]
            no_decode = it.seq.token_ids[it.start + it.num_new_tokens - 1] >= 0
        graphs = self._cuda_graphs
        pick = graphs.pick(num_tokens, len(items), all_decode, no_decode) if graphs is not None else None
        layout = graphs.layout(*pick) if graphs is not None and pick is not None else None
        batch = self.inputs.build(items, sample_rows, layout, self.lora_batch is not None)
        if self._unsampled is not None:  # a deferred step samples before this forward (its tokens are inputs)
            self._flush_sampling()
        if graphs is not None and pick is not None:
            if pick[0] == "prefill" and batch.has_placeholders:
                raise RuntimeError("a prefill graph got a placeholder token (it has no substitution)")
            hidden = graphs.replay(pick[0], pick[1], use_lora, batch.tables)
        else:
            hidden = self._forward(
                batch.views,
                batch.tables,
                batch.layout,
                "eager",
                use_lora,
                batch.num_decodes,
                batch.has_placeholders,
            )
        return batch, hidden

    @torch.inference_mode()
    def launch(self, scheduled: list[ScheduledSeq], defer_sampling: bool = False) -> PendingStep:
        """Queue one step on the device (no host sync). Inputs whose token id is a placeholder (-1) take the
        token sampled for that sequence by the previous launch, on the device. ``defer_sampling``: queue the
        forward and logits only; the sampling is queued later (``_flush_sampling``), after the masks fill."""
        # one-token (decode) chunks first; rows of one LoRA adapter next to each other (one A/B read per tile)
        later = [it.num_new_tokens != 1 for it in scheduled]
        if self.lora_batch is None and later == sorted(later):  # the scheduler's order already (the norm)
            order: list[int] | range = range(len(scheduled))
            items = scheduled
        else:
            order = sorted(range(len(scheduled)), key=lambda i: (later[i], scheduled[i].seq.lora_slot))
            items = [scheduled[i] for i in order]
        sample_rows = [j for j, it in enumerate(items) if it.samples]
        batch, hidden = self._run_model(items, sample_rows)
        seqs = [items[j].seq for j in sample_rows]
        pending = PendingStep(
            sample_rows if items is scheduled else [order[j] for j in sample_rows], seqs, None
        )
        if seqs:
            # (R, V) in the model dtype: the sampler upcasts where it needs fp32
            # a one-sequence step samples its chunk's last row: a view, not a gather kernel
            rows = (
                hidden[batch.num_tokens - 1 : batch.num_tokens] if batch.num_seqs == 1 else hidden[batch.last]
            )
            logits = self.model.lm_head(rows)
            if defer_sampling:  # sampled just before the next forward or at its collect (_flush_sampling)
                pending.logits = logits
                self._unsampled = pending
                for r, seq in enumerate(seqs):
                    seq.sample_row = r  # the next launch's inputs read these rows of prev_tokens
                self.masks.start(pending, self._sampled)  # masks fill on the worker once its tokens land
                return pending
            self._sample_step(pending, logits, deferred=False)
        return pending

    def sample(self, pending: PendingStep) -> None:
        """A step launched with ``defer_sampling`` may be sampled once the previous step is read back: it is
        now if its constrained rows' masks are already filled, else as late as possible — by the next
        ``launch`` just before its forward, or by this step's ``collect`` — so that they fill on the host
        meanwhile (structured/step_masks.py)."""
        assert pending.logits is None or pending is self._unsampled, "launched with defer_sampling"
        if pending is self._unsampled and self.masks.ready(pending):  # its masks are done: sample now
            self._flush_sampling()

    @torch.inference_mode()
    def _flush_sampling(self) -> None:
        pending, self._unsampled = self._unsampled, None
        if pending is not None and pending.logits is not None:
            logits, pending.logits = pending.logits, None
            self._sample_step(pending, logits, deferred=True)

    def _sample_step(self, pending: PendingStep, logits: torch.Tensor, deferred: bool) -> None:
        seqs = pending.seqs
        if deferred:  # masks started at the previous step's collect (or filled now)
            self.sampler.prepare(seqs, self.eos_token_id)  # its host work done before waiting for the masks
            bitmask = self.masks.finish(pending, pending.failed)
        else:
            bitmask = self.masks.fill_now(seqs, pending.failed)
        pending.out = out = self._sample(logits, seqs, bitmask, pending.failed)
        self.prev_tokens[: len(seqs)].copy_(out.token_ids)
        for r, seq in enumerate(seqs):
            seq.sample_row = r
        if self.is_cuda:
            self._copy_out(pending)
        self._sampled = pending

    def _copy_out(self, pending: PendingStep) -> None:
        """Start the device->host copy of the step's results now, behind its own work only."""
        out = pending.out
        assert out is not None, "only a step that sampled is copied out"
        self._out_turn ^= 1
        buf = self._out_bufs[self._out_turn]  # two alternate: at most one step is launched ahead
        host = SamplerOutput(buf[: out.token_ids.shape[0]])
        host.token_ids.copy_(out.token_ids, non_blocking=True)
        if out.logprobs is not None:
            assert out.logprob_ids is not None, "the sampler sets logprobs and logprob_ids together"
            rows, width = out.logprobs.shape
            bufs = self._lp_bufs[self._out_turn]
            if bufs is None or bufs[0].numel() < rows * width:  # persistent, grown to the largest step seen
                size = self._out_bufs[0].shape[0] * width
                bufs = (
                    torch.empty(size, dtype=out.logprobs.dtype, pin_memory=True),
                    torch.empty(size, dtype=out.logprob_ids.dtype, pin_memory=True),
                )
                self._lp_bufs[self._out_turn] = bufs
            host.logprobs = bufs[0][: rows * width].view(rows, width)  # contiguous: a true async copy
            host.logprob_ids = bufs[1][: rows * width].view(rows, width)
            host.logprobs.copy_(out.logprobs, non_blocking=True)
            host.logprob_ids.copy_(out.logprob_ids, non_blocking=True)
        pending.host, pending.ready = host, torch.cuda.Event()
        pending.ready.record()

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence], bitmask: Bitmask | None, failed: dict[int, str]
    ) -> SamplerOutput:
        try:
            return self.sampler(logits, seqs, self.eos_token_id, bitmask)
        except Exception as batch_error:
            # find the request(s) whose sampling state breaks the sampler; the others sample without them
            keep = []
            for r, seq in enumerate(seqs):
                try:
                    self.sampler(logits[r : r + 1], [seq], self.eos_token_id, _row(bitmask, r))
                    keep.append(r)
                except Exception as e:
                    logger.warning("sampling request %s failed: %r", seq.request_id, e)
                    failed[r] = f"sampling failed: {e!r}"
            if len(keep) == len(seqs):
                raise batch_error
            tokens = torch.zeros(len(seqs), dtype=torch.long, device=self.device)
            if not keep:
                return SamplerOutput(tokens)
            idx = torch.tensor(keep, device=self.device)
            out = self.sampler(logits[idx], [seqs[r] for r in keep], self.eos_token_id, _row(bitmask, idx))
            tokens[idx] = out.token_ids
            full = SamplerOutput(tokens)
            if out.logprobs is not None:
                assert out.logprob_ids is not None, "the sampler sets logprobs and logprob_ids together"
                full.logprobs = out.logprobs.new_zeros(len(seqs), out.logprobs.shape[1])
                full.logprob_ids = out.logprob_ids.new_zeros(len(seqs), out.logprob_ids.shape[1])
                full.logprobs[idx], full.logprob_ids[idx] = out.logprobs, out.logprob_ids
            return full

    def collect(self, pending: PendingStep) -> tuple[list[int], list[dict[int, float] | None] | None]:
        """Wait for a launched step and read its sampled tokens: the step's single host sync.

        Returns the token of each sampling row (``pending.seqs`` order; rows in ``pending.failed`` carry a
        meaningless token) and, if any row asked for logprobs, each row's {token: logprob} (chosen + top-n)."""
        if self._unsampled is not None and pending is self._unsampled:
            self._flush_sampling()
        out = pending.out
        if out is None:
            return [], None
        if pending.ready is not None:
            self.masks.settle(pending)  # (device_wait: asleep until the mask worker is done, then the sync)
            pending.ready.synchronize()
            assert pending.host is not None, "_copy_out sets host and ready together"
            out = pending.host
        tokens = out.token_ids.tolist()
        if self._unsampled is not None:  # the deferred next step: its masks fill while we go on
            self.masks.start(self._unsampled, pending, tokens)
        if out.logprobs is None:
            return tokens, None
        assert out.logprob_ids is not None, "the sampler sets logprobs and logprob_ids together"
        lp_vals, lp_ids = out.logprobs.tolist(), out.logprob_ids.tolist()
        lps: list[dict[int, float] | None] = []
        for r, seq in enumerate(pending.seqs):
            n = seq.sampling_params.logprobs
            if n is None:
                lps.append(None)
                continue
            d = {lp_ids[r][0]: lp_vals[r][0]}
            d.update(zip(lp_ids[r][1 : n + 1], lp_vals[r][1 : n + 1], strict=True))
            lps.append(d)
        return tokens, lps


def _row(bitmask: Bitmask | None, rows) -> torch.Tensor | None:
    """The (n, W) mask rows of sampling rows ``rows`` (an int or an index tensor); packed masks unpacked."""
    if bitmask is None:
        return None
    if isinstance(bitmask, tuple):  # (masks (C, W), rows (C,)): every other row all ones (failure path only)
        masks, index = bitmask
        n = max((rows + 1) if isinstance(rows, int) else int(rows.max()) + 1, int(index.max()) + 1)
        bitmask = torch.full((n, masks.shape[1]), -1, dtype=masks.dtype, device=masks.device)
        bitmask[index.long()] = masks
    return bitmask[rows : rows + 1] if isinstance(rows, int) else bitmask[rows]
