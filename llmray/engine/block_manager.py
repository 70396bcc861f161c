"""Paged KV-cache bookkeeping in pure Python: fixed-size blocks, reference counts, prefix caching.

A block holds ``block_size`` tokens' K/V. Each sequence owns a block table (logical -> physical). A full
block is registered in the prefix cache under a hash chain (parent hash, adapter id, its token ids); a new
sequence whose prompt starts with the same full blocks shares them (ref count + 1) instead of computing
them again. A hash hit is confirmed by an exact check (same tokens, same adapter, same parent block), so a
hash collision can never serve wrong K/V. Freed blocks that hold cached content go to an LRU list and are
evicted (their hash forgotten) only when a new block is needed; blocks without content are reused first.
No torch here: the scheduler and these invariants are tested on CPU (cf. nano-vllm's block_manager.py).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass
from operator import attrgetter

import numpy as np

from llmray.engine.block_hash import BlockHasher
from llmray.engine.sequence import PLACEHOLDER, Sequence

_ROOT_HASH = -1  # parent hash of a sequence's first block


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while the block is registered in the prefix cache
    token_ids: bytes | None = None  # its token ids (int64 bytes), for the exact check on a hit
    adapter_id: int = 0
    parent_block_id: int = -1  # physical id of the block before it in the sequence that registered it


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _bytes(tokens: list[int] | np.ndarray) -> bytes:
    return tokens.tobytes() if isinstance(tokens, np.ndarray) else array("q", tokens).tobytes()


_TOKENS, _PARENT, _ADAPTER = attrgetter("token_ids"), attrgetter("parent_block_id"), attrgetter("adapter_id")


class BlockManager:
    """Allocates KV blocks to sequences; check/act pairs (``can_allocate``/``allocate``) as in nano-vllm."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_empty: list[int] = list(range(num_blocks - 1, -1, -1))  # stack; no cached content
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first, evicted first
        self.hash_to_block: dict[int, int] = {}
        self.hasher = BlockHasher(block_size)
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which served from the cache
        # block tables of finished sequences not released yet (``free(defer=True)``): the engine releases
        # them once its next step is launched, while the device runs it; a check that finds too few free
        # blocks releases them first
        self.deferred: list[list[int]] = []

    # --- state --------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_empty) + len(self.free_cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _take_free_block(self) -> int:
        if self.free_empty:
            block_id = self.free_empty.pop()
        else:
            block_id, _ = self.free_cached.popitem(last=False)  # evict the least recently used
            block = self.blocks[block_id]
            if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids, block.parent_block_id = None, None, -1
        block = self.blocks[block_id]
        assert block.ref_count == 0, f"free block {block_id} has ref_count {block.ref_count}"
        block.ref_count = 1
        return block_id

    @staticmethod
    def _tokens(seq: Sequence, start: int, end: int) -> list[int] | np.ndarray:
        """Token ids ``start:end`` of ``seq``: a view of its int64 prompt array where that covers them."""
        pa = seq.prompt_array
        return pa[start:end] if pa is not None and end <= pa.shape[0] else seq.token_ids[start:end]

    def _hash_blocks(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Extend ``seq.block_hashes`` to cover the full blocks among the first ``num_tokens`` tokens."""
        bs = self.block_size
        hashes = seq.block_hashes
        have, want = len(hashes), num_tokens // bs
        if want > have:
            parent = hashes[-1] if have else self.hasher.root(seq.adapter_id)
            hashes.extend(self.hasher.chain(self._tokens(seq, have * bs, want * bs), parent))
        return hashes

    # --- admission ----------------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Physical ids of cached blocks matching the longest full-block prefix of ``seq``.

        At least the last token is always left to compute (its logits pick the next token). The whole
        prompt's hash chain, the lookups and the exact checks run in C (numpy, map, one bytes compare): a
        long prompt's lookup is on its TTFT.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        n = (seq.num_tokens - 1) // bs
        if n == 0:
            return []
        # the first block alone first: a prompt that misses there (most new prompts) hashes no further now
        if self.hash_to_block.get(self._hash_blocks(seq, bs)[0]) is None:
            return []
        ids = list(map(self.hash_to_block.get, self._hash_blocks(seq, n * bs)[:n]))
        found: list[int] = ids[: ids.index(None)] if None in ids else ids  # type: ignore[assignment]
        if not found:
            return found
        k, adapter = len(found), seq.adapter_id
        blocks = list(map(self.blocks.__getitem__, found))
        data = _bytes(self._tokens(seq, 0, k * bs))
        try:
            same = b"".join(map(_TOKENS, blocks)) == data
        except TypeError:  # (a block without token bytes: checked one by one below)
            same = False
        if (
            same
            and list(map(_PARENT, blocks)) == [-1, *found[:-1]]
            and list(map(_ADAPTER, blocks)).count(adapter) == k
        ):
            return found
        w = bs * 8
        for i, block in enumerate(blocks):  # a hash collision: the prefix before the first failed check
            parent = found[i - 1] if i else -1
            if (
                block.token_ids != data[i * w : (i + 1) * w]
                or block.adapter_id != adapter
                or block.parent_block_id != parent
            ):
                return found[:i]
        return found

    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int, num_have: int) -> int:
        return max(0, cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size) - num_have)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int]) -> bool:
        """Can a waiting ``seq`` start with ``cached`` blocks plus room for ``num_new_tokens`` more tokens?"""
        total = cdiv(len(cached) * self.block_size + num_new_tokens, self.block_size)
        free_cached = self.free_cached
        revived = sum(map(free_cached.__contains__, cached)) if free_cached else 0  # (ref count 0)
        if total - len(cached) <= self.num_free_blocks - revived:
            return True
        return self.release_deferred() and self.can_allocate(seq, num_new_tokens, cached)

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int]) -> None:
        assert not seq.block_table and seq.num_computed_tokens == 0, "allocate() is for waiting sequences"
        blocks, free_cached = self.blocks, self.free_cached
        for block_id in cached:
            block = blocks[block_id]
            if block.ref_count == 0:
                del free_cached[block_id]
            block.ref_count += 1
        seq.block_table = list(cached)
        seq.num_computed_tokens = len(cached) * self.block_size
        seq.num_registered_blocks = len(cached)
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_computed_tokens
        for _ in range(self._num_new_blocks(seq, num_new_tokens, len(seq.block_table))):
            seq.block_table.append(self._take_free_block())

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        if self._num_new_blocks(seq, num_new_tokens, len(seq.block_table)) <= self.num_free_blocks:
            return True
        return self.release_deferred() and self.can_append(seq, num_new_tokens)

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self._num_new_blocks(seq, num_new_tokens, len(seq.block_table))):
            seq.block_table.append(self._take_free_block())

    # --- after a step ---------------------------------------------------------------------------
    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the full blocks whose K/V are now computed (call after ``num_computed_tokens`` grew)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n = min(seq.num_computed_tokens, seq.num_tokens)
        full = n // bs
        if full <= seq.num_registered_blocks:
            return  # the common decode step: no block filled up
        start = seq.num_registered_blocks * bs
        if PLACEHOLDER in seq.token_ids[start:n]:  # a token of a step in flight (finish/abort): not known yet
            n = seq.token_ids.index(PLACEHOLDER, start)
            full = n // bs
            if full <= seq.num_registered_blocks:
                return
        hashes = self._hash_blocks(seq, n)
        first, w = seq.num_registered_blocks, bs * 8
        data = _bytes(self._tokens(seq, first * bs, full * bs))
        for i in range(first, full):
            block = self.blocks[seq.block_table[i]]
            if block.token_ids is not None:
                continue  # already registered (by this sequence or shared from the cache)
            block.hash = hashes[i]
            block.token_ids = data[(i - first) * w : (i - first + 1) * w]
            block.adapter_id = seq.adapter_id
            block.parent_block_id = seq.block_table[i - 1] if i else -1
            self.hash_to_block.setdefault(hashes[i], block.block_id)
        seq.num_registered_blocks = full

    def free(self, seq: Sequence, defer: bool = False) -> None:
        """Release every block of ``seq`` (finish, abort or preemption). ``defer``: keep the blocks referenced
        until ``release_deferred`` (a finished sequence: its release is not on the request's latency)."""
        if defer:
            if seq.block_table:
                self.deferred.append(seq.block_table)
        else:
            self._release(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def release_deferred(self) -> bool:
        """Release the deferred block tables; False if there were none."""
        if not self.deferred:
            return False
        tables, self.deferred = self.deferred, []
        for table in tables:
            self._release(table)
        return True

    def _release(self, table: list[int]) -> None:
        blocks, registered = self.blocks, self.hash_to_block
        free_cached, free_empty = self.free_cached, self.free_empty
        for block_id in reversed(table):  # tail blocks end up evicted first
            block = blocks[block_id]
            refs = block.ref_count - 1
            block.ref_count = refs
            if refs:
                assert refs > 0, f"block {block_id} freed twice"
                continue
            h = block.hash
            if h is not None and block.token_ids is not None and registered.get(h) == block_id:
                free_cached[block_id] = None
            else:
                block.hash, block.token_ids, block.parent_block_id = None, None, -1
                free_empty.append(block_id)

    # --- testing --------------------------------------------------------------------------------
    def check_invariants(self, live: list[Sequence]) -> None:
        """Assert the ref counts equal the live block tables' references and the free lists are exact."""
        self.release_deferred()
        refs = [0] * self.num_blocks
        for seq in live:
            for block_id in seq.block_table:
                refs[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], (block, refs[block.block_id])
        free = list(self.free_empty) + list(self.free_cached)
        assert len(free) == len(set(free)), "a block is listed free twice"
        assert set(free) == {b.block_id for b in self.blocks if b.ref_count == 0}, "free lists out of sync"
        for h, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == h, "hash map points to a block with another hash"
