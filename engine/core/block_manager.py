"""Paged KV-cache accounting: block ids, reference counts and prefix-cache hashes.

The block manager never touches tensors. It decides which KV block ids a sequence owns,
shares full blocks between sequences with identical prefixes (prefix caching) and keeps
freed-but-still-cached blocks findable until the allocator needs them again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

from engine.core.sequence import Sequence


def _chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """Hash of one full block chained onto the hash of everything before it.

    Module-level so tests can swap in a deliberately colliding hash. Python's hash of a
    tuple of ints is deterministic; hash(None) may differ between processes, which is
    fine because the cache lives only in this process's memory.
    """
    return hash((parent, tokens))


@dataclass(slots=True)
class _Block:
    """Bookkeeping for one KV block (no data, only who uses it and what it holds)."""

    block_id: int
    ref_count: int = 0
    # Set only while the block is registered in the prefix cache: its chained hash, the
    # exact tokens it holds and the hash of the prefix before it. Keeping tokens and
    # parent lets a lookup reject a hash collision instead of serving wrong KV.
    hash: int | None = None
    tokens: tuple[int, ...] | None = None
    parent_hash: int | None = None


class BlockManager:
    """Allocates KV blocks to sequences, with ref-counted sharing via a prefix cache.

    Free blocks live in an LRU (least recently freed first). A free block that still holds
    a registered hash can be revived by :meth:`match_prefix` until the allocator takes it
    for new data, which is when its hash is forgotten.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # OrderedDict gives O(1) pop-from-head, append-at-tail and removal from the middle
        # (needed when a prefix hit revives a cached free block).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_to_block: dict[int, int] = {}
        self._query_tokens = 0
        self._hit_tokens = 0

    # ------------------------------------------------------------------ properties
    @property
    def num_blocks(self) -> int:
        """Total number of blocks in the pool."""
        return self._num_blocks

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (including ones still cached for prefix reuse)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self._num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently registered in the prefix cache (used or free)."""
        return len(self._hash_to_block)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served from the cache / tokens queried (0.0 before any query)."""
        return self._hit_tokens / self._query_tokens if self._query_tokens else 0.0

    # ------------------------------------------------------------------ allocation
    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks ``seq.block_table`` needs to hold computed + ``num_new_tokens`` tokens."""
        total = seq.num_computed_tokens + num_new_tokens
        needed = -(-total // self._block_size)  # ceil division without floats
        return max(0, needed - len(seq.block_table))

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow ``seq.block_table`` with fresh blocks to cover ``num_new_tokens`` more tokens.

        Returns False, changing nothing, when the free pool is too small.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            block_id, _ = self._free.popitem(last=False)
            block = self._blocks[block_id]
            # The block gets new data: its old cached content is gone for good.
            self._evict_hash(block)
            block.ref_count = 1
            seq.block_table.append(block_id)
        return True

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references to its blocks and reset its cache state.

        Blocks are released in reverse order so a sequence's tail blocks reach the head
        of the free LRU first and are evicted before its head blocks, which are the ones
        other requests are most likely to share.
        """
        # Validate before mutating so a double free leaves the pool untouched.
        for block_id in seq.block_table:
            if self._blocks[block_id].ref_count <= 0:
                raise RuntimeError(
                    f"double free of block {block_id} by request {seq.request_id!r}"
                )
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, seq: Sequence) -> int:
        """Share cached full blocks matching the start of ``seq.token_ids``.

        Only valid for a sequence holding no blocks. Sets ``num_computed_tokens`` and
        ``num_cached_tokens`` to the hit length and returns the number of blocks hit. At
        least one token is always left uncached because its logits are needed.
        """
        if seq.num_computed_tokens != 0 or seq.block_table:
            raise ValueError(
                f"match_prefix needs a sequence without computed tokens or blocks "
                f"(request {seq.request_id!r})"
            )
        self._query_tokens += seq.num_tokens
        seq.num_cached_tokens = 0
        if not self.enable_prefix_caching:
            return 0
        bs = self._block_size
        max_blocks = max(0, (seq.num_tokens - 1) // bs)
        tokens = seq.token_ids
        parent: int | None = None
        hits: list[tuple[int, int]] = []
        for i in range(max_blocks):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = _chain_hash(parent, chunk)
            block_id = self._hash_to_block.get(h)
            if block_id is None:
                break
            block = self._blocks[block_id]
            # A hash match alone could be a collision; compare the real content too.
            if block.hash != h or block.tokens != chunk or block.parent_hash != parent:
                break
            hits.append((block_id, h))
            parent = h
        for block_id, h in hits:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
        num_hit_tokens = len(hits) * bs
        seq.num_computed_tokens = num_hit_tokens
        seq.num_cached_tokens = num_hit_tokens
        self._hit_tokens += num_hit_tokens
        return len(hits)

    def undo_match_prefix(self, seq: Sequence) -> None:
        """Roll back :meth:`match_prefix` for a sequence whose admission then failed.

        Releases the hit blocks and withdraws the query from the hit-rate stats, so a
        request that waits for memory over many steps is counted once, not per attempt.
        """
        self._query_tokens -= seq.num_tokens
        self._hit_tokens -= seq.num_cached_tokens
        seq.num_cached_tokens = 0
        self.free(seq)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s newly completed full blocks in the prefix cache.

        Call after ``seq.num_computed_tokens`` advanced. A block whose content is already
        registered to another block stays unhashed (a duplicate), but its hash is still
        appended to ``seq.block_hashes`` so the chain for later blocks continues.
        """
        if not self.enable_prefix_caching:
            return
        bs = self._block_size
        num_full = seq.num_computed_tokens // bs
        if num_full > len(seq.block_table):
            raise RuntimeError(
                f"request {seq.request_id!r} has {seq.num_computed_tokens} computed tokens "
                f"but only {len(seq.block_table)} blocks"
            )
        tokens = seq.token_ids
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[i - 1] if i else None
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = _chain_hash(parent, chunk)
            block = self._blocks[seq.block_table[i]]
            if h not in self._hash_to_block and block.hash is None:
                self._hash_to_block[h] = block.block_id
                block.hash = h
                block.tokens = chunk
                block.parent_hash = parent
            seq.block_hashes.append(h)

    def _evict_hash(self, block: _Block) -> None:
        """Forget a block's cached content (it is about to be overwritten)."""
        if block.hash is not None:
            if self._hash_to_block.get(block.hash) == block.block_id:
                del self._hash_to_block[block.hash]
            block.hash = None
            block.tokens = None
            block.parent_hash = None

    # ------------------------------------------------------------------ testing aid
    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        """Raise AssertionError unless the pool is consistent with the live ``seqs``.

        Meant for tests: checks ref counts against the block tables, the free LRU against
        zero ref counts, the hash map against the blocks' stored hashes, the totals, and
        that no table lists a block twice.
        """

        def fail(msg: str) -> None:
            # Explicit raise rather than `assert`, so the checks survive `python -O`.
            raise AssertionError(msg)

        counts = [0] * self._num_blocks
        for seq in seqs:
            table = seq.block_table
            if len(set(table)) != len(table):
                fail(f"request {seq.request_id!r} lists a block twice: {table}")
            for block_id in table:
                if not 0 <= block_id < self._num_blocks:
                    fail(f"request {seq.request_id!r} holds invalid block id {block_id}")
                counts[block_id] += 1
            if seq.num_computed_tokens > len(table) * self._block_size:
                fail(f"request {seq.request_id!r} computed more tokens than its blocks hold")
            if len(seq.block_hashes) > len(table):
                fail(f"request {seq.request_id!r} has more block hashes than blocks")
        for block in self._blocks:
            if block.ref_count != counts[block.block_id]:
                fail(
                    f"block {block.block_id} ref_count {block.ref_count} != "
                    f"{counts[block.block_id]} live references"
                )
        zero = {b.block_id for b in self._blocks if b.ref_count == 0}
        if set(self._free) != zero or len(self._free) != len(zero):
            fail(f"free LRU {list(self._free)} != blocks with ref_count 0 {sorted(zero)}")
        for h, block_id in self._hash_to_block.items():
            if self._blocks[block_id].hash != h:
                fail(f"hash map points {h} at block {block_id} holding another hash")
        for block in self._blocks:
            if block.hash is not None and self._hash_to_block.get(block.hash) != block.block_id:
                fail(f"block {block.block_id} has a hash that is not registered to it")
        if self.num_free_blocks + self.num_used_blocks != self._num_blocks:
            fail("free + used != total blocks")
