"""``asyncio.timeout`` for the hot path: the same contract, on shared coarse timers.

``asyncio.timeout`` arms a loop timer for every scope and every ``reschedule``: on uvloop
a libuv timer handle created, started, stopped and closed, and a clock read. A P/D
request opens two or three scopes, and a relayed stream moves its idle deadline twice
per chunk; on the sidecar's JSON path the two scopes were about 5% of its instructions
per request. Here deadlines are kept by the ``GRAIN_S`` slot they fall in, and one loop
timer is armed for the earliest slot still holding any; entering, leaving or moving a
scope is a set insertion or removal, and a new slot (one per ``GRAIN_S`` of deadlines)
a heap push.

The contract is ``asyncio.Timeout``'s: when the deadline passes, the task is cancelled,
and the scope turns that cancellation (and no other) into ``TimeoutError``; ``when``,
``reschedule`` and ``expired`` behave the same. The one difference: a deadline fires up
to ``GRAIN_S`` after it passes (not before, but for the millisecond to which uvloop
rounds every timer, as it does ``asyncio.timeout``'s), which is nothing next to the
bounds of a second or more it serves.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
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
    """One event loop's deadlines, by the slot of ``GRAIN_S`` they fall in.

    One loop timer at a time, armed for the earliest slot holding deadlines. A slot
    emptied before its time is forgotten at once; its place in the heap is dropped when
    the timer reaches it, so a loop that has gone quiet is woken at most once more."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[int, set[Deadline]] = {}
        self._heap: list[int] = []  # slots, each at most once (``_queued``)
        self._queued: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._armed = 0  # the slot the timer is armed for

    def add(self, deadline: Deadline, when: float) -> int:
        slot = math.ceil(when / GRAIN_S)
        waiting = self.slots.get(slot)
        if waiting is None:
            waiting = self.slots[slot] = set()
            if slot not in self._queued:
                self._queued.add(slot)
                heapq.heappush(self._heap, slot)
            if self._timer is None or slot < self._armed:
                self._arm(slot)
        waiting.add(deadline)
        return slot

    def remove(self, deadline: Deadline, slot: int) -> None:
        waiting = self.slots.get(slot)
        if waiting is not None:
            waiting.discard(deadline)
            if not waiting:
                del self.slots[slot]

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = slot
        self._timer = self.loop.call_at(slot * GRAIN_S, self._fire)

    def _fire(self) -> None:
        self._timer = None
        # A loop timer may fire up to a millisecond before its time (uvloop rounds to
        # milliseconds); the slot it was armed for is due all the same.
        due = max(self._armed, math.floor(self.loop.time() / GRAIN_S))
        heap = self._heap
        while heap and (heap[0] <= due or heap[0] not in self.slots):
            slot = heapq.heappop(heap)
            self._queued.discard(slot)
            for deadline in self.slots.pop(slot, ()):
                deadline._expire()
        if heap:
            self._arm(heap[0])


_current = threading.local()


def timeout(delay: float | None) -> Deadline:
    """A scope that times out ``delay`` seconds from now (never, when None)."""
    wheel: _Wheel | None = getattr(_current, "wheel", None)
    # A loop runs in one thread at a time: this thread's wheel serves the loop running
    # here if its own loop is running (asking asyncio for the loop costs a system call).
    if wheel is None or not wheel.loop.is_running():
        wheel = _current.wheel = _Wheel(asyncio.get_running_loop())
    loop = wheel.loop
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
