"""Paged KV block allocation with a prefix cache keyed by a hash chain of block tokens.

Plain Python: the scheduler asks it for blocks, it never touches tensors. A full, computed block
is registered under hash(previous block's hash, its tokens); a later sequence with the same
prefix takes the block by reference. Blocks nobody references stay cached until evicted, least
recently used first, with blocks released by idle sessions evicted last.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from app.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # checked on every hit: a hash collision never lies


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found


def chain_hash(previous: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((previous, token_ids))


class BlockManager:
    """Owns the KV block pool: allocation, ref counts, the prefix cache and its eviction order."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        # Unreferenced blocks that still hold a registered prefix, oldest first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._evictable_sessions: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self._block_hashes: dict[int, list[int]] = {}  # seq_id -> hashes of its leading full blocks
        self.stats = PrefixCacheStats()

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable) + len(self._evictable_sessions)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by sequences or sessions (cached but free is free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        total = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return total - len(seq.block_table) <= self.num_free_blocks

    # -------------------------------------------------------------- allocation
    def match_prefix(self, seq: Sequence) -> int:
        """Take cached blocks for the longest cached prefix of `seq`; return the tokens matched.

        At most `num_tokens - 1` tokens match, so the last token is always computed for logits.
        """
        tokens = seq.all_token_ids
        self.stats.queries += len(tokens)
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        hashes: list[int] = []
        previous: int | None = None
        bs = self.block_size
        for start in range(0, (len(tokens) - 1) // bs * bs, bs):
            chunk = tuple(tokens[start : start + bs])
            block_hash = chain_hash(previous, chunk)
            block_id = self._hash_to_block.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            hashes.append(block_hash)
            previous = block_hash
        matched = len(hashes) * bs
        self._block_hashes[seq.seq_id] = hashes
        seq.num_computed_tokens = matched
        seq.num_cached_tokens = matched
        self.stats.hits += matched
        return matched

    def fork(self, parent: Sequence, child: Sequence) -> int:
        """Share the parent's computed full prompt blocks with a sibling sample (n > 1)."""
        limit = min(parent.num_computed_tokens, child.num_tokens - 1)
        num_blocks = limit // self.block_size
        for block_id in parent.block_table[:num_blocks]:
            self._take(block_id)
        child.block_table = parent.block_table[:num_blocks]
        self._block_hashes[child.seq_id] = self._block_hashes.get(parent.seq_id, [])[:num_blocks]
        child.num_computed_tokens = child.num_cached_tokens = num_blocks * self.block_size
        return child.num_computed_tokens

    def adopt(
        self, seq: Sequence, block_table: list[int], hashes: list[int], num_computed_tokens: int
    ) -> None:
        """Hand blocks held elsewhere (an idle session) to `seq`, references included."""
        seq.block_table = block_table
        seq.num_computed_tokens = seq.num_cached_tokens = num_computed_tokens
        self._block_hashes[seq.seq_id] = hashes

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow `seq`'s block table to hold its computed tokens plus `num_new_tokens`."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > self.num_free_blocks:
            raise RuntimeError("allocate() called without can_allocate()")
        for _ in range(needed):
            seq.block_table.append(self._pop_free())

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that became full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        hashes = self._block_hashes.setdefault(seq.seq_id, [])
        if len(hashes) >= num_full:  # the common case: no block filled up this step
            return
        bs = self.block_size
        first = len(hashes)
        tokens = seq.token_ids_slice(first * bs, num_full * bs)
        previous = hashes[-1] if hashes else None
        for i in range(first, num_full):
            chunk = tuple(tokens[(i - first) * bs : (i - first + 1) * bs])
            block_hash = chain_hash(previous, chunk)
            block = self.blocks[seq.block_table[i]]
            if block_hash not in self._hash_to_block:
                self._hash_to_block[block_hash] = block.block_id
                block.block_hash, block.token_ids = block_hash, chunk
            hashes.append(block_hash)
            previous = block_hash

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; cached blocks stay shareable until evicted."""
        self.release(seq.block_table)
        seq.block_table = []
        self._block_hashes.pop(seq.seq_id, None)

    def detach(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Take `seq`'s blocks and hashes away without dropping references (an idle session)."""
        blocks, seq.block_table = seq.block_table, []
        return blocks, self._block_hashes.pop(seq.seq_id, [])

    def release(self, block_table: Seq[int], session: bool = False) -> None:
        # Tail blocks first, so a chain's leading blocks are the most recently used to survive.
        lru = self._evictable_sessions if session else self._evictable
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.block_hash is not None:
                lru[block_id] = None
            else:
                self._free.append(block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached block (e.g. after an engine failure)."""
        for lru in (self._evictable, self._evictable_sessions):
            while lru:
                self._forget(lru.popitem(last=False)[0])

    # ---------------------------------------------------------------- internals
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._evictable.pop(block_id, None)
            self._evictable_sessions.pop(block_id, None)
        block.ref_count += 1

    def _pop_free(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            lru = self._evictable if self._evictable else self._evictable_sessions
            block_id = lru.popitem(last=False)[0]
            self._forget(block_id, to_free_list=False)
        self.blocks[block_id].ref_count = 1
        return block_id

    def _forget(self, block_id: int, to_free_list: bool = True) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None and self._hash_to_block.get(block.block_hash) == block_id:
            del self._hash_to_block[block.block_hash]
        block.block_hash = block.token_ids = None
        if to_free_list:
            self._free.append(block_id)
