"""KV block ids, per-sequence block tables, reference counts, the free list and the prefix cache.

The pool is `num_blocks` blocks of `block_size` token slots (the workers hold the tensors; this
module only counts). A block is in exactly one of two places:

    in use:  ref_count > 0, listed in the block table of ref_count sequences
    free:    ref_count == 0, in `free_blocks` (an ordered dict used as an LRU queue)

A free block may still hold a cached full block of tokens (it keeps its hash until it is
evicted): allocation takes from the front of the queue (least recently freed first) and drops
the hash it held; a prefix hit takes a cached block out of the queue and back into use.

Prefix hashes are chained: hash(block i) = sha256(hash(block i-1) || tokens of block i), so a
hit on block i implies the whole prefix up to it matches (vLLM's automatic prefix caching).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from shardline.coordinator.sequence import Sequence


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """Chained hash of one full block: sha256(parent hash || int32 little-endian tokens)."""
    return hashlib.sha256(parent + np.asarray(token_ids, dtype="<i4").tobytes()).digest()


class BlockManager:
    """Allocates KV blocks to sequences; optionally shares full blocks of common prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # full-block hash -> block id
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.num_prefix_hits = 0  # blocks served from the prefix cache (tokens / block_size)

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of `seq`'s tokens, in full blocks.

        At least one token is always left to compute, so the last prompt position produces
        logits. Does not take the blocks; `allocate` does.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = b""
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            h = hash_block(parent, seq.token_ids(i * self.block_size, (i + 1) * self.block_size))
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
            parent = h
        return hits

    # ---- allocation ----------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        total = seq.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        need = self.blocks_needed(total) - len(seq.block_table) - len(cached_blocks)
        reusable_free = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        return need <= self.num_free_blocks - reusable_free

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Grow `seq`'s block table to hold num_computed_tokens + num_new_tokens tokens.

        `cached_blocks` (from `find_cached_prefix`, only for a sequence with no blocks yet) are
        taken first and their tokens counted as computed. Returns False, changing nothing,
        when the free list is too short.
        """
        if not self.can_allocate(seq, num_new_tokens, cached_blocks):
            return False
        if cached_blocks:
            assert not seq.block_table and seq.num_computed_tokens == 0
            for b in cached_blocks:
                if self.ref_counts[b] == 0:
                    del self.free_blocks[b]
                self.ref_counts[b] += 1
                seq.block_table.append(b)
                seq.block_hashes.append(self.block_hash[b])
            seq.num_computed_tokens = len(cached_blocks) * self.block_size
            seq.num_cached_tokens = seq.num_computed_tokens
            self.num_prefix_hits += len(cached_blocks)
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            b, _ = self.free_blocks.popitem(last=False)  # least recently freed first
            old = self.block_hash[b]
            if old is not None:  # evict the cached content this block still held
                if self.cached.get(old) == b:
                    del self.cached[old]
                self.block_hash[b] = None
            assert self.ref_counts[b] == 0
            self.ref_counts[b] = 1
            seq.block_table.append(b)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of `seq`'s blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        while len(seq.block_hashes) < num_full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            h = hash_block(parent, seq.token_ids(i * self.block_size, (i + 1) * self.block_size))
            seq.block_hashes.append(h)
            b = seq.block_table[i]
            if h not in self.cached and self.block_hash[b] is None:
                self.cached[h] = b
                self.block_hash[b] = h

    def free(self, seq: Sequence) -> None:
        """Return `seq`'s blocks. Tail blocks are queued first so they are evicted first."""
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0
            if self.ref_counts[b] == 0:
                self.free_blocks[b] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_blocks_sent = 0

    def check_invariants(self) -> None:
        """Every block is either free (ref 0, in the queue) or used; cached map points back."""
        for b in range(self.num_blocks):
            assert (self.ref_counts[b] == 0) == (b in self.free_blocks), b
        for h, b in self.cached.items():
            assert self.block_hash[b] == h
