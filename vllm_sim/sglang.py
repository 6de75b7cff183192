"""SGLang's bootstrap rendezvous, as the simulator plays it.

The same request goes to the prefill and the decode engine at once, both carrying
``bootstrap_host``/``bootstrap_port``/``bootstrap_room``. The prefill engine waits for
the decode engine to join that room through its bootstrap server, then hands the KV
over; each side times out alone.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

__all__ = ["BootstrapTimeout", "RoomTable"]


class BootstrapTimeout(Exception):
    """The peer never showed up in the room."""


@dataclass
class _Room:
    joined: asyncio.Event = field(default_factory=asyncio.Event)
    kv: asyncio.Future[list[int]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class RoomTable:
    """The prefill engine's rooms, keyed by ``bootstrap_room``."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._rooms: dict[int, _Room] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def _room(self, room: int) -> _Room:
        return self._rooms.setdefault(room, _Room())

    async def wait_for_decode(self, room: int) -> None:
        """Prefill side: block until the decode engine joined."""
        try:
            await asyncio.wait_for(self._room(room).joined.wait(), self.timeout_s)
        except TimeoutError:
            self._rooms.pop(room, None)
            raise BootstrapTimeout(f"no decode engine joined room {room}") from None

    def hand_over(self, room: int, token_ids: list[int]) -> None:
        entry = self._rooms.pop(room, None)
        if entry is not None and not entry.kv.done():
            entry.kv.set_result(token_ids)

    def abandon(self, room: int) -> None:
        """The prefill failed or was aborted: the waiting decode engine gets an error."""
        entry = self._rooms.pop(room, None)
        if entry is not None and not entry.kv.done():
            entry.kv.set_exception(BootstrapTimeout(f"prefill for room {room} ended"))

    async def join(self, room: int) -> list[int]:
        """Decode side (through the bootstrap server): join and wait for the KV."""
        entry = self._room(room)
        entry.joined.set()
        try:
            return await asyncio.wait_for(asyncio.shield(entry.kv), self.timeout_s)
        except TimeoutError:
            self._rooms.pop(room, None)
            raise BootstrapTimeout(f"no prefill arrived in room {room}") from None
