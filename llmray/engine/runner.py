"""The only engine code that touches the device: KV cache, step inputs, CUDA graphs, model and sampler.

One ``run(scheduled)`` = build the packed inputs of the step with numpy over the batch (no per-token Python
loops), call ``model.hidden_states`` with our ``PagedAttentionMetadata``, take the logits of the tokens that
sample, sample on the device, and read the sampled tokens back: the step's single host sync.
Decode-only steps are padded to a bucket size (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, ...) and, on CUDA,
replayed from CUDA graphs captured at start-up (``enforce_eager=True`` runs them eagerly, same kernels and
same padding, so both give the same tokens). Cf. nano-vllm's model_runner.py and gpt-fast.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from llmray.config import EngineConfig
from llmray.engine.attention_metadata import PagedAttentionMetadata
from llmray.engine.block_manager import cdiv
from llmray.engine.sampler import Sampler, SamplerOutput
from llmray.engine.scheduler import ScheduledSeq
from llmray.engine.sequence import Sequence
from llmray.kernels._common import num_sms
from llmray.kernels.paged_attention import default_num_splits


@dataclass
class PendingStep:
    indices: list[int]  # positions in the scheduled list of the chunks that sample
    seqs: list[Sequence]
    out: SamplerOutput | None  # device tensors, not read yet


@dataclass
class SampledToken:
    seq_index: int  # index into the scheduled list
    token_id: int
    logprobs: dict[int, float] | None  # chosen token + top-n, or None if not requested


def decode_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 32, 48, 64] + list(range(96, max_num_seqs + 32, 32))
    out = sorted({min(s, max_num_seqs) for s in sizes})
    return out


class ModelRunner:
    def __init__(
        self, model, config: EngineConfig, max_model_len: int, eos_token_id: int | None, lora=None
    ) -> None:
        self.model = model
        self.lora_batch = lora.batch if lora is not None else None  # per-row adapter slots (LoraManager)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        mc = model.config
        self.num_layers, self.num_kv_heads, self.head_dim = (
            mc.num_hidden_layers,
            mc.num_key_value_heads,
            mc.head_dim,
        )
        self.scale = mc.head_dim**-0.5
        self.config = config
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = cdiv(max_model_len, config.block_size)
        self.eos_token_id = eos_token_id
        self.is_cuda = self.device.type == "cuda"
        self.use_triton = self.is_cuda  # tests set it on CPU under TRITON_INTERPRET=1
        self.num_sms = num_sms(self.device) if self.is_cuda else 1
        self.buckets = decode_buckets(config.max_num_seqs)
        self.num_blocks = config.num_kv_blocks or self._profile_num_blocks()
        shape = (2, self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.k_cache = [self.kv_cache[0, i] for i in range(self.num_layers)]
        self.v_cache = [self.kv_cache[1, i] for i in range(self.num_layers)]
        self.sampler = Sampler(self.device, config.seed)
        # (bucket, with LoRA) -> graph and its output; the LoRA variant exists only when adapters are served
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._staging: list[torch.Tensor | None] = [None, None]
        self._stage_idx = 0
        self._prev_tokens = torch.zeros(1, dtype=torch.long, device=self.device)
        self._prev_rows: dict[int, int] = {}
        if self.is_cuda and not config.enforce_eager:
            self._capture_graphs()

    @property
    def block_bytes(self) -> int:
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    # --- KV cache sizing ------------------------------------------------------------------------
    @torch.inference_mode()
    def _profile_num_blocks(self) -> int:
        cfg = self.config
        if not self.is_cuda:  # CPU: room for a few full-length sequences
            return self.max_blocks_per_seq * min(cfg.max_num_seqs, 4)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        n = min(cfg.max_num_batched_tokens, self.max_model_len)
        ids = torch.zeros(1, n, dtype=torch.long, device=self.device)
        hidden = self.model.hidden_states(ids)  # a full-budget prefill step's activations
        rows = min(n, cfg.max_num_seqs)
        logits = self.model.compute_logits(hidden[0, :rows])
        torch.cuda.synchronize()
        vocab = logits.shape[-1]
        activations = (
            torch.cuda.max_memory_allocated() - before + 6 * rows * vocab * 4
        )  # + sampler temporaries
        del hidden, logits
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        usable = (
            total * cfg.gpu_memory_utilization - (total - free) - activations - (1 << 30)
        )  # 1 GiB: graphs
        num_blocks = int(usable // self.block_bytes)
        if num_blocks < 1:
            raise ValueError(
                f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
                f"{activations / 2**30:.1f} GiB needed for activations; raise gpu_memory_utilization "
                f"({cfg.gpu_memory_utilization}) or lower max_num_batched_tokens ({cfg.max_num_batched_tokens})"
            )
        return num_blocks

    # --- inputs -----------------------------------------------------------------------------------
    def _stage(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Move int arrays to the device in ONE copy (through a pinned, double-buffered staging area on CUDA).

        Returns int64 device tensors shaped like the inputs. Two staging buffers alternate, so writing the
        inputs of step N+1 never races the still-pending copy of step N (at most one step is in flight).
        """
        sizes = [a.size for a in arrays]
        total = sum(sizes)
        if not self.is_cuda:
            flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(np.int64))
        else:
            self._stage_idx ^= 1
            buf = self._staging[self._stage_idx]
            if buf is None or buf.numel() < total:
                buf = torch.empty(max(total, 1 << 16), dtype=torch.int64, pin_memory=True)
                self._staging[self._stage_idx] = buf
            view = buf.numpy()
            off = 0
            for a in arrays:
                view[off : off + a.size] = a.ravel()
                off += a.size
            flat = buf[:total].to(self.device, non_blocking=True)
        out, off = [], 0
        for a, n in zip(arrays, sizes, strict=True):
            out.append(flat[off : off + n].view(a.shape))
            off += n
        return out

    def _block_table_array(self, items: list[ScheduledSeq], rows: int, width: int) -> np.ndarray:
        tables = [it.seq.block_table for it in items]
        lens = np.fromiter((len(t) for t in tables), np.int64, len(tables))
        out = np.zeros((rows, width), np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(tables), np.int64, int(lens.sum()))
        out[: len(tables)][np.arange(width)[None, :] < lens[:, None]] = flat
        return out

    def _placeholder_sources(self, ids: np.ndarray, seq_of: list) -> np.ndarray:
        """Row of the previous step's sampled tokens feeding each placeholder input (-1 ids); 0 elsewhere."""
        src = np.zeros(ids.shape[0], np.int64)
        for i in np.flatnonzero(ids < 0).tolist():
            src[i] = self._prev_rows[seq_of[i].seq_id]
        return src

    def _resolve_ids(self, ids: torch.Tensor, src: torch.Tensor, has_placeholders: bool) -> torch.Tensor:
        if not has_placeholders:
            return ids
        return torch.where(ids < 0, self._prev_tokens[src], ids)

    def _metadata(self, tables, query_start, ctx, slots, num_decodes, max_query_len, num_splits):
        return PagedAttentionMetadata(
            k_cache=self.k_cache,
            v_cache=self.v_cache,
            slot_mapping=slots,
            block_tables=tables,
            query_start=query_start,
            context_lens=ctx,
            num_decodes=num_decodes,
            max_query_len=max_query_len,
            scale=self.scale,
            num_splits=num_splits,
            use_triton=self.use_triton,
        )

    def _splits(self, bucket: int) -> int:
        return default_num_splits(bucket, self.num_kv_heads, self.num_sms) if self.is_cuda else 2

    # --- decode steps (padded buckets, CUDA graphs) ------------------------------------------------
    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        maxb = self.buckets[-1]
        dev = self.device
        self._g_ids = torch.zeros(maxb, dtype=torch.long, device=dev)
        self._g_pos = torch.zeros(maxb, dtype=torch.long, device=dev)
        self._g_tables = torch.zeros(maxb, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self._g_ctx = torch.ones(maxb, dtype=torch.int32, device=dev)
        self._g_slots = torch.full((maxb,), -1, dtype=torch.long, device=dev)
        self._g_qstart = torch.arange(maxb + 1, dtype=torch.int32, device=dev)
        pool = None
        variants = (False, True) if self.lora_batch is not None else (False,)
        for bucket, with_lora in itertools.product(reversed(self.buckets), variants):
            self._set_lora_enabled(with_lora)
            meta = self._metadata(
                self._g_tables[:bucket],
                self._g_qstart[: bucket + 1],
                self._g_ctx[:bucket],
                self._g_slots[:bucket],
                bucket,
                0,
                self._splits(bucket),
            )
            ids, pos = self._g_ids[:bucket][None], self._g_pos[:bucket][None]
            self.model.hidden_states(ids, pos, meta)  # warm-up: compiles the Triton kernels for this shape
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model.hidden_states(ids, pos, meta)[0]
            pool = graph.pool() if pool is None else pool
            self.graphs[(bucket, with_lora)] = (graph, hidden)
        self._set_lora_enabled(False)
        torch.cuda.synchronize()

    def _set_lora_enabled(self, enabled: bool) -> None:
        if self.lora_batch is not None:
            self.lora_batch.enabled = enabled

    def _lora_rows(self, slots: np.ndarray | None) -> tuple[np.ndarray, bool]:
        """Per-row adapter slots to stage (a 1-element dummy when no row of the step uses an adapter)."""
        if slots is None or not (slots >= 0).any():
            return np.zeros(1, np.int64), False
        return slots, True

    def _apply_lora_rows(self, d_slots: torch.Tensor, use: bool) -> None:
        self._set_lora_enabled(use)
        if use:
            self.lora_batch.set_rows(d_slots)

    def _run_decode(self, items: list[ScheduledSeq]) -> torch.Tensor:
        b, bs = len(items), self.block_size
        bucket = next(s for s in self.buckets if s >= b)
        width = max(len(it.seq.block_table) for it in items)
        ids = np.zeros(bucket, np.int64)
        ids[:b] = [it.seq.token_ids[it.start] for it in items]
        pos = np.zeros(bucket, np.int64)
        pos[:b] = [it.start for it in items]
        tables = self._block_table_array(items, bucket, width)
        ctx = np.ones(bucket, np.int64)  # padding rows attend to one (ignored) token
        ctx[:b] = pos[:b] + 1
        slots = np.full(bucket, -1, np.int64)
        slots[:b] = tables[np.arange(b), pos[:b] // bs] * bs + pos[:b] % bs
        placeholders = bool((ids < 0).any())
        src = (
            self._placeholder_sources(ids, [it.seq for it in items])
            if placeholders
            else np.zeros(1, np.int64)
        )
        lora_rows = None
        if self.lora_batch is not None:
            lora_rows = np.full(bucket, -1, np.int64)
            lora_rows[:b] = [it.seq.lora_slot for it in items]
        lora_rows, use_lora = self._lora_rows(lora_rows)
        d_ids, d_pos, d_tables, d_ctx, d_slots, d_src, d_lora = self._stage(
            ids, pos, tables, ctx, slots, src, lora_rows
        )
        d_ids = self._resolve_ids(d_ids, d_src, placeholders)
        self._apply_lora_rows(d_lora, use_lora)
        if (bucket, use_lora) in self.graphs:
            graph, hidden = self.graphs[(bucket, use_lora)]
            self._g_ids[:bucket].copy_(d_ids)
            self._g_pos[:bucket].copy_(d_pos)
            # columns past ``width`` keep stale ids: the kernels never read past a sequence's context
            self._g_tables[:bucket, :width].copy_(d_tables)
            self._g_ctx[:bucket].copy_(d_ctx)
            self._g_slots[:bucket].copy_(d_slots)
            graph.replay()
        else:
            qstart = torch.arange(bucket + 1, device=self.device)
            meta = self._metadata(d_tables, qstart, d_ctx, d_slots, bucket, 0, self._splits(bucket))
            hidden = self.model.hidden_states(d_ids[None], d_pos[None], meta)[0]
        return self.model.compute_logits(hidden)[:b]  # (b, V)

    # --- mixed prefill/decode steps (eager) --------------------------------------------------------
    def _run_mixed(self, items: list[ScheduledSeq], sample_rows: list[int]) -> torch.Tensor:
        b, bs = len(items), self.block_size
        q_lens = np.fromiter((it.num_new_tokens for it in items), np.int64, b)
        starts = np.fromiter((it.start for it in items), np.int64, b)
        cu = np.zeros(b + 1, np.int64)
        np.cumsum(q_lens, out=cu[1:])
        ids = np.fromiter(
            itertools.chain.from_iterable(
                it.seq.token_ids[it.start : it.start + it.num_new_tokens] for it in items
            ),
            np.int64,
            int(cu[-1]),
        )
        pos = np.arange(cu[-1]) - np.repeat(cu[:-1] - starts, q_lens)  # (N,)
        width = max(len(it.seq.block_table) for it in items)
        tables = self._block_table_array(items, b, width)
        seq_of_token = np.repeat(np.arange(b), q_lens)
        slots = tables[seq_of_token, pos // bs] * bs + pos % bs
        num_decodes = int((q_lens == 1).sum())  # items arrive sorted: one-token sequences first
        placeholders = bool((ids < 0).any())
        src = np.zeros(1, np.int64)
        if placeholders:
            src = self._placeholder_sources(ids, [items[i].seq for i in seq_of_token.tolist()])
        last = cu[1:][sample_rows] - 1
        lora_rows = None
        if self.lora_batch is not None:
            lora_rows = np.repeat(np.fromiter((it.seq.lora_slot for it in items), np.int64, b), q_lens)
        lora_rows, use_lora = self._lora_rows(lora_rows)
        d_ids, d_pos, d_tables, d_cu, d_ctx, d_slots, d_src, d_last, d_lora = self._stage(
            ids, pos, tables, cu, starts + q_lens, slots, src, last, lora_rows
        )
        d_ids = self._resolve_ids(d_ids, d_src, placeholders)
        self._apply_lora_rows(d_lora, use_lora)
        meta = self._metadata(
            d_tables,
            d_cu,
            d_ctx,
            d_slots,
            num_decodes,
            int(q_lens[num_decodes:].max()) if num_decodes < b else 0,
            self._splits(next((s for s in self.buckets if s >= num_decodes), num_decodes)),
        )
        hidden = self.model.hidden_states(d_ids[None], d_pos[None], meta)[0]
        return self.model.compute_logits(hidden[d_last])

    # --- one step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, scheduled: list[ScheduledSeq]) -> PendingStep:
        """Queue one step on the device (no host sync). Inputs whose token id is a placeholder (-1) take the
        token sampled for that sequence by the previous launch, on the device."""
        # one-token (decode) chunks first; rows of one LoRA adapter next to each other (one A/B read per tile)
        order = sorted(
            range(len(scheduled)),
            key=lambda i: (scheduled[i].num_new_tokens != 1, scheduled[i].seq.lora_slot),
        )
        items = [scheduled[i] for i in order]
        sample_rows = [j for j, it in enumerate(items) if it.samples]
        if items[-1].num_new_tokens == 1 and len(items) <= self.buckets[-1]:
            logits = self._run_decode(items)
            if len(sample_rows) < len(items):
                logits = logits[self.sampler._tensor(sample_rows, torch.long)]
        else:
            logits = self._run_mixed(items, sample_rows)
        seqs = [items[j].seq for j in sample_rows]
        pending = PendingStep([order[j] for j in sample_rows], seqs, None)
        if seqs:
            pending.out = self.sampler(logits, seqs, self.eos_token_id)
            self._prev_tokens = pending.out.token_ids
            self._prev_rows = {seq.seq_id: r for r, seq in enumerate(seqs)}
        return pending

    def collect(self, pending: PendingStep) -> list[SampledToken]:
        """Wait for a launched step and read its sampled tokens: the step's single host sync."""
        out = pending.out
        if out is None:
            return []
        tokens = out.token_ids.tolist()
        lp_vals = lp_ids = None
        if out.logprobs is not None:
            lp_vals, lp_ids = out.logprobs.tolist(), out.logprob_ids.tolist()
        result = []
        for r, (index, seq) in enumerate(zip(pending.indices, pending.seqs, strict=True)):
            n = seq.sampling_params.logprobs
            lps = None
            if n is not None and lp_vals is not None:
                lps = {lp_ids[r][0]: lp_vals[r][0]}
                lps.update(zip(lp_ids[r][1 : n + 1], lp_vals[r][1 : n + 1], strict=True))
            result.append(SampledToken(index, tokens[r], lps))
        return result

    def run(self, scheduled: list[ScheduledSeq]) -> list[SampledToken]:
        """Compute one step and wait for it; a sampled token for every chunk that reaches its sequence's end."""
        return self.collect(self.launch(scheduled))
