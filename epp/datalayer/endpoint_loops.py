"""One repeating task per endpoint of a datastore.

Pollers (the metrics scraper, the data sources) keep one loop per endpoint: started when
an endpoint arrives, cancelled when it leaves or when the poller stops. A loop whose
endpoint left while its poll was in flight ends after that poll: membership, not the
exception the cancellation surfaced as, decides whether it goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence

from epp.datastore import Datastore, Endpoint

__all__ = ["EndpointLoops", "phase_of"]


class EndpointLoops:
    """Runs ``once(endpoint)`` every ``period_s()`` seconds for each endpoint while started.

    ``forget(key)`` is called for each endpoint that leaves; ``changed()`` after each
    change of membership."""

    def __init__(
        self,
        label: str,
        once: Callable[[Endpoint], Awaitable[object]],
        period_s: Callable[[], float],
        *,
        forget: Callable[[str], object] | None = None,
        changed: Callable[[], None] | None = None,
    ) -> None:
        self.label = label
        self._once = once
        self._period_s = period_s
        self._forget = forget
        self._changed = changed
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = False

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, datastore: Datastore) -> None:
        self._started = True
        datastore.add_listener(self._on_change)
        self._on_change(list(datastore.snapshot()), [])

    async def stop(self) -> None:
        self._started = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_change(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        if not self._started:
            return
        for ep in removed:
            if self._forget is not None:
                self._forget(ep.key)
            task = self._tasks.pop(ep.key, None)
            if task is not None:
                task.cancel()
        for ep in added:
            if ep.key not in self._tasks:
                self._tasks[ep.key] = asyncio.create_task(
                    self._loop(ep), name=f"{self.label} {ep.key}"
                )
        if self._changed is not None:
            self._changed()

    async def _loop(self, endpoint: Endpoint) -> None:
        me = asyncio.current_task()
        # Loops started together (a pool discovered at once) would poll in step, a burst
        # of every endpoint's poll holding the event loop each period (96 scrapes at
        # once); after its first poll, each loop moves to its own phase of the period.
        phase: float | None = phase_of(endpoint.key)
        while True:
            started = time.monotonic()
            await self._once(endpoint)
            if self._tasks.get(endpoint.key) is not me:
                return
            period = self._period_s()
            if phase is not None:
                period, phase = period * phase, None
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))


def phase_of(key: str) -> float:
    """An endpoint's fixed share of the period, in (0, 1], spread evenly over keys."""
    return (zlib.crc32(key.encode()) + 1) / 2**32
