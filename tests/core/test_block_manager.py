"""BlockManager: allocation, ref counts, prefix cache, LRU eviction (pure Python)."""

from __future__ import annotations

import pytest

from engine.core import block_manager as bm_mod
from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence


def make_seq(tokens, rid=None):
    return Sequence(request_id=rid or f"r{id(tokens)}", prompt_token_ids=list(tokens))


def prefill(bm: BlockManager, seq: Sequence) -> None:
    """Admit and fully compute a sequence's prompt, registering its full blocks."""
    bm.match_prefix(seq)
    n = seq.num_tokens - seq.num_computed_tokens
    assert bm.allocate_slots(seq, n)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)


@pytest.mark.parametrize(
    "args",
    [(0, 4), (-1, 4), (4, 0), (4, -2), (2.5, 4), (4, True)],
)
def test_constructor_validates(args):
    with pytest.raises(ValueError):
        BlockManager(*args)


def test_allocate_and_free_refcounts():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = make_seq(range(10), "a")
    assert bm.blocks_needed(s, 10) == 3
    assert bm.allocate_slots(s, 10)
    assert s.block_table == [0, 1, 2]  # head of the LRU first
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 5
    assert bm.blocks_needed(s, 10) == 0  # already covered
    s.num_computed_tokens = 10
    assert bm.blocks_needed(s, 2) == 0  # 12 tokens fit in 3 blocks
    assert bm.blocks_needed(s, 3) == 1
    assert bm.allocate_slots(s, 3)
    assert len(s.block_table) == 4
    bm.check_invariants([s])
    bm.free(s)
    assert s.block_table == [] and s.block_hashes == [] and s.num_computed_tokens == 0
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0
    bm.check_invariants([])


def test_allocate_failure_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq(range(4), "a")
    assert bm.allocate_slots(a, 4)
    b = make_seq(range(7), "b")
    free_before = list(bm._free)
    assert not bm.allocate_slots(b, 7)  # needs 4, only 2 free
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert list(bm._free) == free_before
    assert bm.num_free_blocks == 2
    bm.check_invariants([a, b])


def test_double_free_raises():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq(range(4), "a")
    assert bm.allocate_slots(a, 4)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table  # simulate a buggy caller freeing the same blocks again
    with pytest.raises((RuntimeError, AssertionError)):
        bm.free(a)
    # Nothing changed by the failed free.
    assert bm.num_free_blocks == 4
    a.block_table = []
    bm.check_invariants([])


def test_prefix_hit_reuses_same_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "a")
    prefill(bm, a)
    assert len(a.block_hashes) == 2  # two full blocks registered, the partial one not
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 99, 98, 97], "b")
    hits = bm.match_prefix(b)
    assert hits == 2
    assert b.block_table == a.block_table[:2]
    assert b.block_hashes == a.block_hashes
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm._blocks[a.block_table[0]].ref_count == 2
    bm.check_invariants([a, b])
    assert bm.prefix_cache_hit_rate == pytest.approx(8 / (10 + 11))
    # Partial match: only the first block matches.
    c = make_seq([1, 2, 3, 4, 0, 0, 0, 0, 5], "c")
    assert bm.match_prefix(c) == 1
    assert c.block_table == a.block_table[:1]
    bm.check_invariants([a, b, c])


def test_prefix_hit_from_free_cached_blocks():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    prefill(bm, a)
    cached = list(a.block_table[:2])
    bm.free(a)
    assert bm.num_free_blocks == 8
    b = make_seq([1, 2, 3, 4, 6], "b")
    assert bm.match_prefix(b) == 2
    assert b.block_table == cached
    # The revived blocks left the free pool.
    assert bm.num_free_blocks == 6
    assert not set(cached) & set(bm._free)
    bm.check_invariants([b])


def test_cap_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(8), "a")  # exactly two full blocks
    prefill(bm, a)
    assert len(a.block_hashes) == 2
    b = make_seq(range(8), "b")
    assert bm.match_prefix(b) == 1  # capped at (8 - 1) // 4
    assert b.num_computed_tokens == 4
    assert b.num_tokens - b.num_computed_tokens >= 1
    # Identical 9-token prompt may use both blocks.
    c = make_seq(range(9), "c")
    assert bm.match_prefix(c) == 2
    # A one-block prompt gets nothing.
    d = make_seq(range(4), "d")
    assert bm.match_prefix(d) == 0
    bm.check_invariants([a, b, c, d])


def test_match_prefix_requires_fresh_sequence():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq(range(4), "a")
    assert bm.allocate_slots(a, 2)
    with pytest.raises(ValueError):
        bm.match_prefix(a)


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5], "a")
    prefill(bm, a)
    assert a.block_hashes == []
    b = make_seq([1, 2, 3, 4, 5], "b")
    assert bm.match_prefix(b) == 0
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert bm.prefix_cache_hit_rate == 0.0
    bm.check_invariants([a, b])


def test_chained_hash_distinguishes_position():
    # Same block tokens after a different prefix must not hit.
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([1, 1, 2, 2, 9], "a")
    prefill(bm, a)
    b = make_seq([3, 3, 2, 2, 9], "b")
    assert bm.match_prefix(b) == 0


def test_hash_collision_is_not_a_hit(monkeypatch):
    # Every block hashes the same: only the stored tokens/parent can tell them apart.
    monkeypatch.setattr(bm_mod, "_chain_hash", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    prefill(bm, a)
    assert bm.num_cached_blocks == 1  # second block collided with the first: duplicate
    b = make_seq([7, 8, 3, 4, 5], "b")
    assert bm.match_prefix(b) == 0
    assert b.block_table == [] and b.num_computed_tokens == 0
    # Same first block: a genuine hit; its second block's stored tokens/parent differ.
    c = make_seq([1, 2, 3, 4, 5], "c")
    assert bm.match_prefix(c) == 1
    assert c.block_table == a.block_table[:1]
    bm.check_invariants([a, b, c])


def test_duplicate_block_stays_unhashed_but_chain_continues():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    b = make_seq([1, 2, 3, 4, 6], "b")
    # Both compute concurrently without sharing (b admitted before a registered).
    for s in (a, b):
        assert bm.match_prefix(s) == 0
        assert bm.allocate_slots(s, 5)
        s.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    bm.cache_full_blocks(b)
    assert b.block_hashes == a.block_hashes  # chain continues for the duplicate
    assert bm.num_cached_blocks == 2  # only a's blocks are registered
    for bid in b.block_table:
        assert bm._blocks[bid].hash is None
    bm.check_invariants([a, b])


def test_lru_eviction_order_tail_blocks_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_seq([1, 2, 3, 4, 5, 6, 7], "a")  # 3 full blocks + 1 partial
    prefill(bm, a)
    table = list(a.block_table)
    assert len(table) == 4 and bm.num_cached_blocks == 3
    bm.free(a)
    # Reverse-order free: the tail of the sequence sits nearest the LRU head.
    assert list(bm._free)[-4:] == table[::-1]
    # Allocate 3 blocks: the 2 never-used blocks, then a's last (partial) block.
    filler = make_seq(range(6), "f")
    assert bm.allocate_slots(filler, 6)
    assert filler.block_table[2] == table[3]
    # One more block evicts a's third full block (its hash is dropped), not its first.
    g = make_seq(range(2), "g")
    assert bm.allocate_slots(g, 2)
    assert g.block_table == [table[2]]
    assert bm.num_cached_blocks == 2
    bm.check_invariants([filler, g])
    # a's first two blocks are still findable; the third is gone.
    h = make_seq([1, 2, 3, 4, 5, 6, 7], "h")
    assert bm.match_prefix(h) == 2
    assert h.block_table == table[:2]
    bm.check_invariants([filler, g, h])


def test_lru_least_recently_freed_evicted_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 1, 0], "a")
    b = make_seq([2, 2, 0], "b")
    prefill(bm, a)
    prefill(bm, b)
    a_head, b_head = a.block_table[0], b.block_table[0]
    bm.free(b)  # b freed first -> evicted first
    bm.free(a)
    x = make_seq(range(4), "x")
    assert bm.allocate_slots(x, 4)  # takes b's two blocks (b's tail first)
    assert b_head in x.block_table and a_head not in x.block_table
    assert bm.match_prefix(make_seq([2, 2, 0], "b2")) == 0
    a2 = make_seq([1, 1, 0], "a2")
    assert bm.match_prefix(a2) == 1 and a2.block_table == [a_head]


def test_shared_block_freed_only_when_last_ref_drops():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_seq([1, 2, 3], "a")
    prefill(bm, a)
    b = make_seq([1, 2, 4], "b")
    prefill(bm, b)
    shared = a.block_table[0]
    assert b.block_table[0] == shared
    bm.free(a)
    assert shared not in bm._free
    bm.check_invariants([b])
    bm.free(b)
    assert shared in bm._free
    bm.check_invariants([])


def test_undo_match_prefix_restores_stats_and_blocks():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_seq([1, 2, 3], "a")
    prefill(bm, a)
    rate = bm.prefix_cache_hit_rate
    b = make_seq([1, 2, 5], "b")
    assert bm.match_prefix(b) == 1
    bm.undo_match_prefix(b)
    assert bm.prefix_cache_hit_rate == rate
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_cached_tokens == 0
    bm.check_invariants([a, b])


def test_check_invariants_detects_corruption():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq(range(4), "a")
    assert bm.allocate_slots(a, 4)
    bm._blocks[a.block_table[0]].ref_count += 1
    with pytest.raises(AssertionError):
        bm.check_invariants([a])
    bm._blocks[a.block_table[0]].ref_count -= 1
    bm.check_invariants([a])
    a.block_table.append(a.block_table[0])
    with pytest.raises(AssertionError):
        bm.check_invariants([a])
