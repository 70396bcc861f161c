"""Block manager and scheduler invariants (pure Python): prefix hits, exact checks, LRU, no leaked blocks."""

from __future__ import annotations

import random
from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from llmray.engine.block_manager import BlockManager
from llmray.engine.sampling_params import SamplingParams
from llmray.engine.scheduler import Scheduler
from llmray.engine.sequence import Sequence, SequenceStatus


def seq(tokens, max_tokens=4, adapter_id=0):
    return Sequence("r", list(tokens), SamplingParams(max_tokens=max_tokens), adapter_id=adapter_id)


def admit(bm: BlockManager, s: Sequence) -> list[int]:
    cached = bm.find_cached_prefix(s)
    n = s.num_tokens - len(cached) * bm.block_size
    assert bm.can_allocate(s, n, cached)
    bm.allocate(s, n, cached)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)
    return cached


def test_prefix_hit_shares_blocks_and_leaves_last_token():
    bm = BlockManager(16, 4)
    a = seq(range(10))  # blocks [0..3], [4..7] full; [8, 9] partial
    admit(bm, a)
    b = seq(list(range(8)) + [50, 51, 52])
    cached = admit(bm, b)
    assert cached == a.block_table[:2] and b.num_cached_tokens == 8
    assert bm.blocks[cached[0]].ref_count == 2
    c = seq(range(8))  # exactly two full blocks: the last token must still be computed -> one hit only
    assert bm.find_cached_prefix(c) == a.block_table[:1]
    assert bm.prefix_cache_hits == 8 and bm.prefix_cache_queries == 21
    bm.check_invariants([a, b])


def test_adapter_id_is_part_of_the_hash():
    bm = BlockManager(16, 4)
    admit(bm, seq(range(9)))
    assert bm.find_cached_prefix(seq(range(9), adapter_id=1)) == []
    assert len(bm.find_cached_prefix(seq(range(9)))) == 2


def test_hash_collision_is_caught_by_the_exact_check():
    bm = BlockManager(16, 4)
    a = seq(range(9))
    admit(bm, a)
    victim = bm.blocks[a.block_table[0]]
    victim.token_ids = (9, 9, 9, 9)  # pretend another prompt collided on this hash
    assert bm.find_cached_prefix(seq(range(9))) == []
    victim.token_ids = array("q", range(4)).tobytes()  # (blocks keep their ids as int64 bytes)
    bm.blocks[a.block_table[1]].parent_block_id = 99  # a collision on the second block: the first still hits
    assert bm.find_cached_prefix(seq(range(9))) == a.block_table[:1]


def test_freed_cached_blocks_are_reused_lru_and_evicted_last():
    bm = BlockManager(4, 4)
    a = seq(range(9))  # 3 blocks, two full ones get cached
    admit(bm, a)
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.free_cached) == 2
    b = seq(range(9))  # hit after free: blocks revived from the LRU list
    assert admit(bm, b) == table[:2]
    bm.free(b)
    c = seq(range(100, 116))  # needs all 4 blocks: evicts the cached ones
    admit(bm, c)
    assert bm.hash_to_block == {h: i for h, i in bm.hash_to_block.items() if i in c.block_table}
    assert bm.find_cached_prefix(seq(range(9))) == []
    bm.check_invariants([c])


def _drive(ops, num_blocks, block_size, budget, max_seqs, caching):
    rng = random.Random(0)
    s = Scheduler(num_blocks, block_size, max_seqs, budget, max_model_len=64, enable_prefix_caching=caching)
    live: list[Sequence] = []
    for op, a, b in ops:
        if op == "add":
            prefix = [1, 2, 3, 4, 5, 6, 7, 8][: a % 9]  # shared prefixes make cache hits
            prompt = prefix + [rng.randrange(50) for _ in range(1 + b % 20)]
            new = Sequence(f"r{len(live)}", prompt, SamplingParams(max_tokens=1 + a % 8))
            try:
                s.add(new)
            except ValueError:
                continue  # too big for this cache: rejected up front
            live.append(new)
        elif op == "step" and s.has_unfinished():
            out = s.schedule()
            assert out.num_tokens <= budget and len(s.running) <= max_seqs
            s.commit(out)
            for item in out.scheduled:
                sq = item.seq
                if item.samples and sq.status is SequenceStatus.RUNNING:
                    sq.append_token(rng.randrange(50))
                    if sq.num_output_tokens >= sq.sampling_params.max_tokens:
                        s.finish(sq, "length")
        elif op == "abort" and live:
            victim = live[a % len(live)]
            if not victim.is_finished:
                s.finish(victim, "abort")
        active = [q for q in live if q.status is SequenceStatus.RUNNING]
        s.block_manager.check_invariants(active)
        for q in live:
            if q.status is SequenceStatus.WAITING:
                assert q.block_table == [] and q.num_computed_tokens == 0
    for _ in range(500):  # everything left runs to completion: no deadlock
        if not s.has_unfinished():
            break
        out = s.schedule()
        assert out.scheduled, "scheduler stalled with work left"
        s.commit(out)
        for item in out.scheduled:
            if item.samples and item.seq.status is SequenceStatus.RUNNING:
                item.seq.append_token(7)
                if item.seq.num_output_tokens >= item.seq.sampling_params.max_tokens:
                    s.finish(item.seq, "length")
    assert not s.has_unfinished()
    bm = s.block_manager
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    assert all(b.ref_count == 0 for b in bm.blocks)
    return s


OPS = st.lists(
    st.tuples(st.sampled_from(["add", "step", "step", "abort"]), st.integers(0, 50), st.integers(0, 50)),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, num_blocks=st.integers(4, 24), budget=st.integers(1, 40), caching=st.booleans())
def test_no_block_leaks_after_any_mix_of_finish_abort_preempt(ops, num_blocks, budget, caching):
    _drive(ops, num_blocks, block_size=4, budget=budget, max_seqs=4, caching=caching)


def test_tiny_cache_forces_preemption_and_all_finish():
    ops = [("add", 7, 0)] * 6 + [("step", 0, 0)] * 30  # 8-token prompts growing to 16 tokens
    s = _drive(ops, num_blocks=8, block_size=4, budget=64, max_seqs=6, caching=False)
    assert s.num_preemptions > 0


def test_request_that_can_never_fit_is_rejected():
    s = Scheduler(4, 4, 4, 16, max_model_len=32)
    try:
        s.add(Sequence("r", list(range(15)), SamplingParams(max_tokens=5)))
    except ValueError as e:
        assert "5 KV blocks" in str(e) and "holds only 4" in str(e)
    else:
        raise AssertionError("expected ValueError")
    try:
        s.add(Sequence("r", list(range(30)), SamplingParams(max_tokens=5)))
    except ValueError as e:
        assert "30 tokens" in str(e) and "max_tokens=5" in str(e) and "32" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_decodes_scheduled_before_prefill_chunks():
    s = Scheduler(64, 4, 8, max_num_batched_tokens=6, max_model_len=64)
    a = Sequence("a", list(range(3)), SamplingParams(max_tokens=8))
    s.add(a)
    out = s.schedule()
    s.commit(out)
    a.append_token(1)
    b = Sequence("b", list(range(20)), SamplingParams(max_tokens=8))
    s.add(b)
    out = s.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 5)]


def test_block_hash_chain_numpy_equals_scalar_and_depends_on_prefix_and_adapter():
    import numpy as np

    from llmray.engine.block_hash import BlockHasher

    hasher, rng = BlockHasher(4), random.Random(3)
    toks = [rng.randrange(-1, 151936) for _ in range(4 * 40)]  # (-1: a placeholder hashes consistently)
    root = hasher.root(0)
    whole = hasher.chain(np.array(toks, np.int64), root)  # the numpy path
    step, parent = [], root
    for i in range(40):  # block by block: the scalar path
        step += hasher.chain(toks[4 * i : 4 * i + 4], parent)
        parent = step[-1]
    assert whole == step and len(set(whole)) == 40
    assert hasher.chain(toks[:8], hasher.root(1)) != whole[:2]  # the adapter is in the chain
    other = [toks[0] + 1] + toks[1:8]
    assert hasher.chain(other, root)[1] != whole[1]  # a block's hash names its whole prefix


def test_same_prefix_computed_twice_registers_one_owner():
    bm = BlockManager(16, 4)
    a, b = seq(range(9)), seq(range(9))
    for s in (a, b):  # both admitted before either registers: no hit, each computes the prefix
        assert bm.find_cached_prefix(s) == []
        bm.allocate(s, 9, [])
    for s in (a, b):
        s.num_computed_tokens = s.num_tokens
        bm.cache_full_blocks(s)
    assert set(bm.hash_to_block.values()) == set(a.block_table[:2])  # b's copies are not in the map
    bm.check_invariants([a, b])
    owners = a.block_table[:2]
    bm.free(b)
    bm.free(a)
    assert sorted(bm.free_cached) == sorted(owners) and bm.num_free_blocks == 16
    bm.check_invariants([])
    c = seq(range(9))
    assert len(admit(bm, c)) == 2
    bm.check_invariants([c])


def test_finished_blocks_are_released_later_or_when_a_check_needs_them():
    s = Scheduler(4, 4, 4, 64, max_model_len=64)
    bm = s.block_manager
    a = Sequence("a", list(range(9)), SamplingParams(max_tokens=1))
    s.add(a)
    s.commit(s.schedule())
    s.finish(a, "length")
    assert bm.num_free_blocks == 1 and bm.deferred  # held until released (the engine: after its next launch)
    b = Sequence("b", list(range(8)) + [60], SamplingParams(max_tokens=1))  # a hit on a's deferred blocks
    s.add(b)
    out = s.schedule()
    assert [it.start for it in out.scheduled] == [8] and bm.deferred
    assert bm.release_deferred() and not bm.release_deferred()
    bm.check_invariants([b])
    s.commit(out)
    s.finish(b, "length")
    c = Sequence("c", list(range(100, 115)), SamplingParams(max_tokens=1))  # needs all 4 blocks: frees b's
    s.add(c)
    assert s.schedule().scheduled and not bm.deferred
    bm.check_invariants([c])
