"""BlockManager: allocation and free, ref counts, the LRU free list and the chained-hash prefix cache."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.coordinator.block_manager import BlockManager, hash_block
from tests.helpers import make_prompt, make_seq

BS = 4


def computed(bm: BlockManager, seq, n: int | None = None) -> None:
    """Pretend a step computed `n` more tokens (default: all) and register full blocks."""
    seq.num_computed_tokens += seq.num_tokens - seq.num_computed_tokens if n is None else n
    bm.cache_full_blocks(seq)
    bm.check_invariants()


def admit(bm: BlockManager, seq) -> list[int]:
    """Allocate the whole prompt with prefix hits, as the scheduler does; returns the hit blocks."""
    hits = bm.find_cached_prefix(seq)
    n = seq.num_tokens - len(hits) * bm.block_size
    assert bm.allocate(seq, n, hits)
    bm.check_invariants()
    return hits


def test_allocate_and_free_round_trip():
    bm = BlockManager(8, BS)
    seq = make_seq(10)
    assert bm.can_allocate(seq, 10)
    assert bm.allocate(seq, 10)
    bm.check_invariants()
    assert len(seq.block_table) == 3 == len(set(seq.block_table))
    assert bm.num_free_blocks == 5 and all(bm.ref_counts[b] == 1 for b in seq.block_table)
    assert bm.usage == pytest.approx(3 / 8)
    bm.free(seq)
    bm.check_invariants()
    assert seq.block_table == [] and bm.num_free_blocks == 8 and bm.usage == 0.0


def test_allocate_grows_the_table_only_when_a_block_fills():
    bm = BlockManager(8, BS)
    seq = make_seq(4)
    assert bm.allocate(seq, 4)
    computed(bm, seq)
    assert len(seq.block_table) == 1
    seq.output_token_ids.append(5)  # the 5th token needs a second block
    assert bm.allocate(seq, 1)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    computed(bm, seq)
    seq.output_token_ids.append(6)  # the 6th fits in block 2: nothing new
    assert bm.allocate(seq, 1)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6


def test_allocation_fails_without_changing_anything():
    bm = BlockManager(4, BS)
    a, b = make_seq(12), make_seq(8)
    assert bm.allocate(a, 12)
    assert not bm.can_allocate(b, 8)
    before = (list(bm.ref_counts), list(bm.free_blocks), dict(bm.cached))
    assert not bm.allocate(b, 8)
    assert b.block_table == [] and (list(bm.ref_counts), list(bm.free_blocks), dict(bm.cached)) == before
    assert bm.can_allocate(b, 4) and bm.allocate(b, 4)  # exactly the last block
    assert bm.num_free_blocks == 0
    bm.check_invariants()


def test_prefix_hit_shares_full_blocks_of_a_system_prompt():
    bm = BlockManager(32, BS)
    system = make_prompt(10, salt=1)  # 2 full blocks + 2 tokens
    a = make_seq(prompt=system + [1, 2, 3])
    assert admit(bm, a) == []
    computed(bm, a)
    b = make_seq(prompt=system + [7, 8, 9, 10, 11])
    hits = admit(bm, b)
    assert hits == a.block_table[:2]  # only the 2 full blocks of the shared prefix
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert all(bm.ref_counts[x] == 2 for x in hits)
    assert bm.num_prefix_hits == 2
    # freeing one keeps the shared blocks in use by the other
    bm.free(a)
    bm.check_invariants()
    assert all(bm.ref_counts[x] == 1 for x in hits) and not any(x in bm.free_blocks for x in hits)
    bm.free(b)
    bm.check_invariants()
    assert bm.num_free_blocks == 32


def test_prefix_hit_only_on_full_computed_blocks():
    bm = BlockManager(32, BS)
    a = make_seq(prompt=make_prompt(7, salt=2))
    admit(bm, a)
    computed(bm, a, 5)  # block 0 full and computed, block 1 partly computed
    assert len(a.block_hashes) == 1
    b = make_seq(prompt=make_prompt(7, salt=2) + [1, 2])
    assert bm.find_cached_prefix(b) == a.block_table[:1]
    computed(bm, a)  # 7 tokens: still one full block
    assert bm.find_cached_prefix(b) == a.block_table[:1]


def test_prefix_hit_never_covers_the_whole_prompt():
    bm = BlockManager(32, BS)
    prompt = make_prompt(8, salt=3)
    a = make_seq(prompt=prompt)
    admit(bm, a)
    computed(bm, a)
    assert len(a.block_hashes) == 2
    same = make_seq(prompt=prompt)  # both blocks cached, but the last token must be computed
    hits = admit(bm, same)
    assert hits == a.block_table[:1]
    assert same.num_computed_tokens == 4 and len(same.block_table) == 2
    assert same.block_table[1] != a.block_table[1]


def test_chained_hash_a_different_earlier_block_breaks_the_chain():
    bm = BlockManager(32, BS)
    a = make_seq(prompt=[1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, a)
    computed(bm, a)
    # same second block, different first block: no hit at all
    b = make_seq(prompt=[9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert bm.find_cached_prefix(b) == []
    assert hash_block(hash_block(b"", [1, 2, 3, 4]), [5, 6, 7, 8]) != hash_block(hash_block(b"", [9, 9, 9, 9]), [5, 6, 7, 8])
    # same first block, different second: the chain stops after block 0
    c = make_seq(prompt=[1, 2, 3, 4, 0, 6, 7, 8, 9])
    assert bm.find_cached_prefix(c) == a.block_table[:1]
    # a's second block's tokens at the start of another prompt: its KV saw another prefix
    d = make_seq(prompt=[5, 6, 7, 8, 1])
    assert bm.find_cached_prefix(d) == []


def test_prefix_caching_off_never_hits():
    bm = BlockManager(32, BS, enable_prefix_caching=False)
    a = make_seq(prompt=make_prompt(9, salt=4))
    admit(bm, a)
    computed(bm, a)
    assert bm.cached == {} and a.block_hashes == []
    assert bm.find_cached_prefix(make_seq(prompt=make_prompt(9, salt=4))) == []


def test_cached_free_block_is_revived_by_a_hit():
    bm = BlockManager(8, BS)
    prompt = make_prompt(9, salt=5)
    a = make_seq(prompt=prompt)
    admit(bm, a)
    computed(bm, a)
    first_two = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 8 and len(bm.cached) == 2  # freed, content still cached
    b = make_seq(prompt=prompt)
    assert admit(bm, b) == first_two
    assert all(x not in bm.free_blocks and bm.ref_counts[x] == 1 for x in first_two)
    assert bm.num_free_blocks == 5


def test_lru_eviction_order_of_cached_free_blocks():
    """Allocation takes the least recently freed block; a sequence's tail blocks go first."""
    bm = BlockManager(6, BS)
    a = make_seq(prompt=make_prompt(8, salt=6))  # 2 full blocks
    b = make_seq(prompt=make_prompt(8, salt=7))
    admit(bm, a)
    admit(bm, b)
    computed(bm, a)
    computed(bm, b)
    a0, a1 = a.block_table
    b0, b1 = b.block_table
    bm.free(a)  # queue: [never used x2] a1 a0
    bm.free(b)  # queue: ... a1 a0 b1 b0
    assert list(bm.free_blocks)[-4:] == [a1, a0, b1, b0]
    filler = make_seq(3)
    assert bm.allocate(filler, 8)  # two untouched blocks first: the cache survives
    assert len(bm.cached) == 4
    c = make_seq(1)
    assert bm.allocate(c, 1)
    assert c.block_table == [a1]  # then the least recently freed: a's tail block
    assert bm.find_cached_prefix(make_seq(prompt=make_prompt(8, salt=6) + [1])) == [a0]
    assert len(bm.find_cached_prefix(make_seq(prompt=make_prompt(8, salt=7) + [1]))) == 2
    d = make_seq(1)
    assert bm.allocate(d, 1) and d.block_table == [a0]
    assert bm.find_cached_prefix(make_seq(prompt=make_prompt(8, salt=6) + [1])) == []
    bm.check_invariants()


def test_duplicate_content_is_cached_once_and_freed_cleanly():
    """Two sequences compute the same prompt side by side (no hit): one copy is registered."""
    bm = BlockManager(8, BS)
    prompt = make_prompt(5, salt=8)
    a, b = make_seq(prompt=prompt), make_seq(prompt=prompt)
    admit(bm, a)
    admit(bm, b)  # a's block is not computed yet: no hit
    computed(bm, a)
    computed(bm, b)
    assert len(bm.cached) == 1 and list(bm.cached.values()) == [a.block_table[0]]
    bm.free(a)
    bm.free(b)
    bm.check_invariants()
    assert bm.num_free_blocks == 8


def test_can_allocate_counts_free_cached_blocks_as_taken():
    """Reviving a cached free block removes it from the free list, so it cannot also be new."""
    bm = BlockManager(3, BS)
    prompt = make_prompt(9, salt=9)
    a = make_seq(prompt=prompt)
    admit(bm, a)
    computed(bm, a)
    bm.free(a)
    b = make_seq(prompt=prompt + [1, 2, 3, 4])  # 13 tokens: 4 blocks > 3
    hits = bm.find_cached_prefix(b)
    assert len(hits) == 2
    assert not bm.can_allocate(b, 13 - 8, hits)
    assert not bm.allocate(b, 13 - 8, hits)
    assert b.block_table == [] and bm.num_free_blocks == 3
    bm.check_invariants()
    assert bm.can_allocate(b, 4, hits)  # 12 tokens fit exactly


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "grow", "free"]), st.integers(0, 5),
                          st.integers(1, 9), st.integers(0, 2)), max_size=60))
def test_random_operations_keep_invariants(ops):
    """Random admits (with shared prefixes), growth and frees: invariants hold, all blocks return."""
    bm = BlockManager(12, BS)
    live = {}
    for op, slot, n, prefix in ops:
        seq = live.get(slot)
        if op == "alloc" and seq is None:
            s = make_seq(prompt=make_prompt(8, salt=prefix) + make_prompt(n, salt=100 + slot))
            hits = bm.find_cached_prefix(s)
            free_before = bm.num_free_blocks
            if bm.allocate(s, s.num_tokens - len(hits) * BS, hits):
                live[slot] = s
                computed(bm, s)
            else:
                assert bm.num_free_blocks == free_before and s.block_table == []
        elif op == "grow" and seq is not None:
            seq.output_token_ids.extend(range(n))
            if bm.allocate(seq, n):
                computed(bm, seq)
            else:
                seq.output_token_ids[-n:] = []
        elif op == "free" and seq is not None:
            bm.free(live.pop(slot))
        bm.check_invariants()
        in_use = sum(len(s.block_table) for s in live.values())
        distinct = len({b for s in live.values() for b in s.block_table})
        assert sum(bm.ref_counts) == in_use and bm.num_free_blocks == 12 - distinct
        for s in live.values():
            assert len(s.block_table) == bm.blocks_needed(s.num_tokens)
    for s in live.values():
        bm.free(s)
    bm.check_invariants()
    assert bm.num_free_blocks == 12 and sum(bm.ref_counts) == 0
