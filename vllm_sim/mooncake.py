"""Mooncake-style transfers: the prefill engine publishes KV under a ``transfer_id``.

The decode leg runs concurrently, so its pull (through the prefill engine's bootstrap
server) waits for the prefill to publish. Each transfer is taken once; unclaimed ones
expire after the lease time.
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["TransferTable"]


class TransferTable:
    def __init__(self, lease_s: float, wait_s: float) -> None:
        self.lease_s = lease_s
        self.wait_s = wait_s
        # transfer id -> (token ids, engine id of the rank that published them)
        # (None: the prefill ended without publishing, so a waiting decode stops waiting.)
        self._ready: dict[str, asyncio.Future[tuple[list[int], str] | None]] = {}
        self._published_at: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._published_at)

    def _future(self, transfer_id: str) -> asyncio.Future[tuple[list[int], str] | None]:
        fut = self._ready.get(transfer_id)
        if fut is None:
            fut = self._ready[transfer_id] = asyncio.get_running_loop().create_future()
        return fut

    def publish(self, transfer_id: str, token_ids: list[int], engine_id: str) -> None:
        fut = self._future(transfer_id)
        if not fut.done():
            fut.set_result((token_ids, engine_id))
            self._published_at[transfer_id] = time.monotonic()

    def refuse(self, transfer_id: str) -> None:
        """The prefill finished without publishing (not at the cap): nothing to take."""
        fut = self._future(transfer_id)
        if not fut.done():
            fut.set_result(None)
            self._published_at[transfer_id] = time.monotonic()

    async def take(self, transfer_id: str) -> tuple[list[int], str] | None:
        """(KV, publishing engine id) once published, or None after ``wait_s``; one taker."""
        fut = self._future(transfer_id)
        try:
            tokens = await asyncio.wait_for(asyncio.shield(fut), self.wait_s)
        except TimeoutError:
            if not fut.done():
                self._ready.pop(transfer_id, None)
            return None
        self._ready.pop(transfer_id, None)
        self._published_at.pop(transfer_id, None)
        return tokens

    def expire(self) -> int:
        cutoff = time.monotonic() - self.lease_s
        stale = [tid for tid, at in self._published_at.items() if at < cutoff]
        for tid in stale:
            self._published_at.pop(tid, None)
            self._ready.pop(tid, None)
        return len(stale)
