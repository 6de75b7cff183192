"""Which engines hold which blocks, per medium, with bounded memory.

For every engine: a dict block hash -> media bitmask, in insertion (store) order, capped
at ``capacity_per_engine`` entries by dropping the oldest stored. Forgetting a block
only makes the index under-report, never claim a block an engine lacks. A lookup walks
the prompt's hashes per engine and stops at the first miss: the leading run is all a
prefix cache can reuse.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from epp.kv_events.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent

__all__ = ["KvBlockIndex", "medium_bit"]

_MEDIA: dict[str, int] = {"GPU": 1, "CPU": 2, "STORAGE": 4}


def medium_bit(medium: str) -> int:
    """The bit of a medium; unknown media share one bit so they are still tracked."""
    return _MEDIA.get(medium.upper(), 8)


class KvBlockIndex:
    def __init__(self, capacity_per_engine: int) -> None:
        if capacity_per_engine <= 0:
            raise ValueError("capacity_per_engine must be positive")
        self.capacity = capacity_per_engine
        self._engines: dict[str, dict[int, int]] = {}
        self.evicted = 0

    # -- updates ---------------------------------------------------------------
    def apply(self, engine: str, events: Iterable[KvEvent]) -> None:
        for ev in events:
            if isinstance(ev, BlockStored):
                self.store(engine, ev.block_hashes, ev.medium)
            elif isinstance(ev, BlockRemoved):
                self.remove(engine, ev.block_hashes, ev.medium)
            elif isinstance(ev, AllBlocksCleared):
                self.clear(engine)

    def store(self, engine: str, hashes: Iterable[int], medium: str = "GPU") -> None:
        blocks = self._engines.get(engine)
        if blocks is None:
            blocks = self._engines[engine] = {}
        bit = medium_bit(medium)
        for h in hashes:
            # Re-inserting moves the block to the young end of the store order.
            blocks[h] = blocks.pop(h, 0) | bit
        over = len(blocks) - self.capacity
        if over > 0:
            it = iter(blocks)
            oldest = [next(it) for _ in range(over)]
            for h in oldest:
                del blocks[h]
            self.evicted += over

    def remove(self, engine: str, hashes: Iterable[int], medium: str = "GPU") -> None:
        blocks = self._engines.get(engine)
        if not blocks:
            return
        bit = medium_bit(medium)
        for h in hashes:
            mask = blocks.get(h)
            if mask is None:
                continue
            mask &= ~bit
            if mask:
                blocks[h] = mask
            else:
                del blocks[h]

    def clear(self, engine: str) -> None:
        """Forget what ``engine`` holds but keep it known (it published, so it is live)."""
        if engine in self._engines:
            self._engines[engine] = {}

    def drop_engine(self, engine: str) -> None:
        self._engines.pop(engine, None)

    # -- queries ---------------------------------------------------------------
    def match(
        self, hashes: Sequence[int], engines: Iterable[str], media: int = 1
    ) -> dict[str, int]:
        """Engine -> leading blocks of ``hashes`` it holds on any of ``media`` (0 omitted)."""
        out: dict[str, int] = {}
        if not hashes:
            return out
        first = hashes[0]
        for engine in engines:
            blocks = self._engines.get(engine)
            if not blocks:
                continue
            mask = blocks.get(first)
            if mask is None or not mask & media:
                continue
            n = _leading_run(blocks, hashes, media)
            if n:
                out[engine] = n
        return out

    def holds(self, block: int, engines: Iterable[str], media: int = 1) -> bool:
        """Whether one of ``engines`` holds ``block`` on one of ``media``."""
        for engine in engines:
            blocks = self._engines.get(engine)
            if blocks and blocks.get(block, 0) & media:
                return True
        return False

    def knows(self, engine: str) -> bool:
        return engine in self._engines

    def engine_blocks(self, engine: str) -> int:
        blocks = self._engines.get(engine)
        return len(blocks) if blocks is not None else 0

    def total_blocks(self) -> int:
        return sum(len(b) for b in self._engines.values())

    def engines(self) -> list[str]:
        return list(self._engines)


def _leading_run(blocks: dict[int, int], hashes: Sequence[int], media: int) -> int:
    """How many leading ``hashes`` ``blocks`` holds on one of ``media``: the lookups and
    the search for the first miss run in C; a run whose masks lack ``media`` is walked."""
    masks = list(map(blocks.get, hashes))
    try:
        n = masks.index(None)
    except ValueError:
        n = len(masks)
    if all(m & media for m in set(masks[:n])):  # type: ignore[operator]
        return n
    for i in range(n):
        if not masks[i] & media:  # type: ignore[operator]
            return i
    return n
