"""A paged KV cache with automatic prefix caching, as vLLM keeps it.

Prompts are cut into fixed-size blocks; a full block is identified by a hash chained over
every block before it, so equal hashes mean equal prefixes. Blocks in use by a request (or
pinned by a KV lease) have a reference count; unreferenced full blocks stay cached and are
evicted least-recently-used when a new block is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .block_hash import chain_hashes
from .kv_events import all_cleared, block_removed, block_stored

__all__ = ["Allocation", "EventSink", "PrefixCache", "block_hashes"]

# Receives KV events (vLLM's map encoding) as blocks are cached and evicted.
EventSink = Callable[[dict[str, Any]], None]


def block_hashes(token_ids: Sequence[int], block_size: int, seed: str | None = None) -> list[bytes]:
    """Chained hashes of the full blocks of ``token_ids``, exactly as vLLM's sha256_cbor."""
    return chain_hashes(token_ids, block_size, seed)


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # None for a partial (uncacheable) block


@dataclass
class Allocation:
    """Blocks one request holds, in prompt order."""

    block_ids: list[int] = field(default_factory=list)
    hit_blocks: int = 0


class PrefixCache:
    def __init__(self, num_blocks: int, block_size: int, hash_seed: str | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.event_sink: EventSink | None = None
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # Cached full blocks by hash; order = LRU order of the unreferenced ones.
        self._by_hash: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.queries_tokens = 0
        self.hits_tokens = 0
        self._used = 0  # blocks with a reference (kept so that usage costs O(1))

    # -- queries ---------------------------------------------------------------
    def cached_prefix_blocks(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks are cached (no side effects)."""
        n = 0
        for h in hashes:
            if h not in self._by_hash:
                break
            n += 1
        return n

    @property
    def used_blocks(self) -> int:
        return self._used

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks

    def tokens_of(self, block_ids: Sequence[int]) -> list[bytes | None]:
        return [self._blocks[i].block_hash for i in block_ids]

    # -- allocation ------------------------------------------------------------
    def allocate(self, token_ids: Sequence[int], *, record_query: bool = True) -> Allocation:
        """Take blocks for a whole prompt, reusing cached leading blocks.

        When the cache is full of referenced blocks, the remaining blocks are simply not
        held (the simulation does not preempt); usage then saturates at 1.0.
        """
        hashes = block_hashes(token_ids, self.block_size, self.hash_seed)
        hit = self.cached_prefix_blocks(hashes)
        if record_query:
            self.queries_tokens += len(token_ids)
            self.hits_tokens += hit * self.block_size
        alloc = Allocation(hit_blocks=hit)
        stored: list[int] = []  # indexes of newly cached blocks, announced once
        for i, h in enumerate(hashes):
            block_id = self._by_hash.get(h) if i < hit else None
            if block_id is None:
                block_id = self._take_block()
                if block_id is None:
                    self._announce(token_ids, hashes, stored)
                    return alloc
                self._assign_hash(block_id, h)
                stored.append(i)
            self._ref(block_id)
            alloc.block_ids.append(block_id)
        self._announce(token_ids, hashes, stored)
        if len(token_ids) % self.block_size:
            block_id = self._take_block()
            if block_id is not None:
                self._ref(block_id)
                alloc.block_ids.append(block_id)
        return alloc

    def insert_computed(self, token_ids: Sequence[int]) -> None:
        """Record a prefix whose KV arrived from elsewhere as cached (unreferenced)."""
        self.release(self.allocate(token_ids, record_query=False).block_ids)

    def release(self, block_ids: Sequence[int]) -> None:
        for block_id in block_ids:
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            self._used -= 1
            if block.block_hash is None:
                self._free.append(block_id)
            else:
                self._evictable[block_id] = None
                self._evictable.move_to_end(block_id)

    def reset(self) -> None:
        for block in self._blocks:
            if block.ref_count == 0 and block.block_hash is not None:
                self._forget(block.block_id, announce=False)
                self._free.append(block.block_id)
        self._evictable.clear()
        if self.event_sink is not None:
            self.event_sink(all_cleared())

    def _announce(self, token_ids: Sequence[int], hashes: list[bytes], stored: list[int]) -> None:
        if self.event_sink is None or not stored:
            return
        # Newly cached blocks follow the hit prefix, so they form one contiguous run.
        first, last = stored[0], stored[-1]
        bs = self.block_size
        self.event_sink(
            block_stored(
                list(hashes[first : last + 1]),
                hashes[first - 1] if first else None,
                list(token_ids[first * bs : (last + 1) * bs]),
                bs,
            )
        )

    # -- internals ---------------------------------------------------------------
    def _ref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            self._evictable.pop(block_id, None)
            self._used += 1
        block.ref_count += 1

    def _take_block(self) -> int | None:
        if self._free:
            return self._free.pop()
        if self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            self._forget(block_id)
            return block_id
        return None

    def _forget(self, block_id: int, *, announce: bool = True) -> None:
        block = self._blocks[block_id]
        if block.block_hash is not None and self._by_hash.get(block.block_hash) == block_id:
            del self._by_hash[block.block_hash]
            if announce and self.event_sink is not None:
                self.event_sink(block_removed([block.block_hash]))
        block.block_hash = None

    def _assign_hash(self, block_id: int, block_hash: bytes) -> None:
        self._blocks[block_id].block_hash = block_hash
        self._by_hash[block_hash] = block_id
