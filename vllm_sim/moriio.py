"""MoRI-IO write mode: the prefill engine writes KV into the decode engine.

vLLM's MoRIIOConnector in write mode: the decode engine allocates blocks and notifies
the prefill engine (``remote_host``:``remote_notify_port`` of its kv_transfer_params);
the prefill engine, once its prompt is computed *and* the notify came, writes the KV to
the decode engine (``remote_host``:``remote_handshake_port`` of *its* params). Either
may come first (serial or parallel dispatch). Here both hops are HTTP posts to the
engines' side channels; a transfer is keyed by ``transfer_id``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

__all__ = ["Outgoing", "WriteTable"]


@dataclass
class Outgoing:
    """Producer side: one finished prefill waiting for the decode's notify."""

    token_ids: list[int] | None = None  # None until the prompt is computed
    dest: str | None = None  # the decode engine's side channel, "http://host:port"
    notified: bool = False
    at: float = field(default_factory=time.monotonic)

    @property
    def due(self) -> bool:
        return self.token_ids is not None and self.notified


class WriteTable:
    def __init__(self, lease_s: float, wait_s: float) -> None:
        self.lease_s = lease_s
        self.wait_s = wait_s
        self._out: dict[str, Outgoing] = {}
        self._in: dict[str, asyncio.Future[list[int]]] = {}

    def __len__(self) -> int:
        return len(self._out)

    # -- producer ----------------------------------------------------------------------
    def ready(self, transfer_id: str, token_ids: list[int], dest: str) -> Outgoing | None:
        """The prompt is computed; returns the transfer when the write is due now."""
        entry = self._out.setdefault(transfer_id, Outgoing())
        entry.token_ids, entry.dest = token_ids, dest
        return self._pop_due(transfer_id)

    def notified(self, transfer_id: str) -> Outgoing | None:
        """The decode's blocks are ready; returns the transfer when the write is due now."""
        self._out.setdefault(transfer_id, Outgoing()).notified = True
        return self._pop_due(transfer_id)

    def _pop_due(self, transfer_id: str) -> Outgoing | None:
        entry = self._out.get(transfer_id)
        if entry is None or not entry.due:
            return None
        return self._out.pop(transfer_id)

    # -- consumer ----------------------------------------------------------------------
    def _future(self, transfer_id: str) -> asyncio.Future[list[int]]:
        fut = self._in.get(transfer_id)
        if fut is None:
            fut = self._in[transfer_id] = asyncio.get_running_loop().create_future()
        return fut

    def expect(self, transfer_id: str) -> None:
        """Register a decode's wait before it notifies, so no write is missed."""
        self._future(transfer_id)

    def received(self, transfer_id: str, token_ids: list[int]) -> bool:
        """A write arrived; False when no decode waits for it (unknown or gave up)."""
        fut = self._in.get(transfer_id)
        if fut is None or fut.done():
            return False
        fut.set_result(token_ids)
        return True

    def forget(self, transfer_id: str) -> None:
        self._in.pop(transfer_id, None)

    async def wait(self, transfer_id: str) -> list[int] | None:
        """The written KV, or None after ``wait_s``."""
        fut = self._future(transfer_id)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.wait_s)
        except TimeoutError:
            return None
        finally:
            self._in.pop(transfer_id, None)

    def expire(self) -> int:
        cutoff = time.monotonic() - self.lease_s
        stale = [tid for tid, entry in self._out.items() if entry.at < cutoff]
        for tid in stale:
            del self._out[tid]
        return len(stale)
