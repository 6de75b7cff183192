"""A directory several simulated engines share, standing in for LMCache-style storage.

KV blocks are stored as empty files named by their chained hash (``kv/``); encoder
outputs of the ``ec-example`` connector by their mm_hash (``ec/``). File operations run
off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SharedStorage"]


class SharedStorage:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._kv = self.root / "kv"
        self._ec = self.root / "ec"
        for d in (self._kv, self._ec):
            d.mkdir(parents=True, exist_ok=True)

    async def store_blocks(self, hashes: Sequence[bytes]) -> None:
        await asyncio.to_thread(self._touch_all, self._kv, [h.hex() for h in hashes])

    async def cached_blocks(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks the storage holds."""
        return await asyncio.to_thread(self._leading, [h.hex() for h in hashes])

    async def store_item(self, mm_hash: str) -> None:
        await asyncio.to_thread(self._touch_all, self._ec, [mm_hash])

    async def has_item(self, mm_hash: str) -> bool:
        return await asyncio.to_thread((self._ec / mm_hash).exists)

    @staticmethod
    def _touch_all(directory: Path, names: list[str]) -> None:
        for name in names:
            (directory / name).touch()

    def _leading(self, names: list[str]) -> int:
        count = 0
        for name in names:
            if not (self._kv / name).exists():
                break
            count += 1
        return count
