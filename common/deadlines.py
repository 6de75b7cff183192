"""``asyncio.timeout`` for the hot path: the same contract, on shared coarse timers.

``asyncio.timeout`` arms a loop timer for every scope and every ``reschedule``: on uvloop
a libuv timer handle created, started, stopped and closed, and a clock read. A P/D
request opens two or three scopes, and a relayed stream moves its idle deadline twice
per chunk; on the sidecar's JSON path the two scopes were about 5% of its instructions
per request. Here the deadlines falling in the same ``GRAIN_S`` slot share one loop
timer, armed by the first of them; entering, leaving or moving a scope is a set
insertion or removal.

The contract is ``asyncio.Timeout``'s: when the deadline passes, the task is cancelled,
and the scope turns that cancellation (and no other) into ``TimeoutError``; ``when``,
``reschedule`` and ``expired`` behave the same. The one difference: a deadline fires up
to ``GRAIN_S`` after it passes (never before), which is nothing next to the bounds of a
second or more it serves.
"""

from __future__ import annotations

import asyncio
import enum
import math
import threading
from types import TracebackType

__all__ = ["GRAIN_S", "Deadline", "timeout"]

GRAIN_S = 0.02


class _State(enum.Enum):
    CREATED = "created"
    ENTERED = "active"
    EXPIRING = "expiring"
    EXPIRED = "expired"
    EXITED = "finished"


class _Wheel:
    """One event loop's deadlines, by the slot of ``GRAIN_S`` they fall in."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[int, set[Deadline]] = {}

    def add(self, deadline: Deadline, when: float) -> int:
        slot = math.ceil(when / GRAIN_S)
        waiting = self.slots.get(slot)
        if waiting is None:
            waiting = self.slots[slot] = set()
            self.loop.call_at(slot * GRAIN_S, self._fire, slot)
        waiting.add(deadline)
        return slot

    def remove(self, deadline: Deadline, slot: int) -> None:
        waiting = self.slots.get(slot)
        if waiting is not None:
            waiting.discard(deadline)  # an emptied slot goes when its timer fires

    def _fire(self, slot: int) -> None:
        for deadline in self.slots.pop(slot, ()):
            deadline._expire()


_current = threading.local()


def timeout(delay: float | None) -> Deadline:
    """A scope that times out ``delay`` seconds from now (never, when None)."""
    loop = asyncio.get_running_loop()
    wheel: _Wheel | None = getattr(_current, "wheel", None)
    if wheel is None or wheel.loop is not loop:
        wheel = _current.wheel = _Wheel(loop)
    return Deadline(wheel, None if delay is None else loop.time() + delay)


class Deadline:
    """An async context manager bounding the time of its block, as ``asyncio.Timeout``."""

    __slots__ = ("_cancelling", "_slot", "_state", "_task", "_wheel", "_when")

    def __init__(self, wheel: _Wheel, when: float | None) -> None:
        self._wheel = wheel
        self._when = when
        self._slot: int | None = None
        self._state = _State.CREATED
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0

    def when(self) -> float | None:
        """The current deadline, in the loop's time."""
        return self._when

    def expired(self) -> bool:
        return self._state in (_State.EXPIRING, _State.EXPIRED)

    def reschedule(self, when: float | None) -> None:
        """Move the deadline (None: no deadline)."""
        if self._state is not _State.ENTERED:
            if self._state is _State.CREATED:
                raise RuntimeError("Timeout has not been entered")
            raise RuntimeError(f"Cannot change state of {self._state.value} Timeout")
        if self._slot is not None:
            self._wheel.remove(self, self._slot)
            self._slot = None
        self._when = when
        if when is not None:
            self._slot = self._wheel.add(self, when)

    async def __aenter__(self) -> Deadline:
        if self._state is not _State.CREATED:
            raise RuntimeError("Timeout has already been entered")
        task = asyncio.current_task(self._wheel.loop)
        if task is None:
            raise RuntimeError("Timeout should be used inside a task")
        self._state = _State.ENTERED
        self._task = task
        self._cancelling = task.cancelling()
        self.reschedule(self._when)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if self._slot is not None:
            self._wheel.remove(self, self._slot)
            self._slot = None
        if self._state is _State.EXPIRING:
            self._state = _State.EXPIRED
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                # No other cancellation asked for since: this one is ours.
                raise TimeoutError from exc_val
        elif self._state is _State.ENTERED:
            self._state = _State.EXITED

    def _expire(self) -> None:
        """The slot's timer fired with this deadline in it."""
        if self._state is not _State.ENTERED or self._task is None:
            return
        self._slot = None
        self._task.cancel()
        self._state = _State.EXPIRING
