"""In-flight eviction: dispatched requests a higher-priority one may displace.

Every dispatched request is tracked (priority, dispatch time, target) until its stream
ends. The filter policy decides which tracked requests may be evicted (llm-d's
``sheddable-eviction-filter``: priority < 0), the ordering policy which goes first
(``priority-then-time-eviction-order-policy``: lowest priority, then the most recently
dispatched). When a band waits because the pool is saturated, the flow controller asks
``RequestEvictor.reclaim`` to evict victims of strictly lower priority: each victim's
``signal`` is set, its ext_proc stream answers with an immediate response (429,
``x-llm-d-request-dropped-reason: evicted``) and the gateway resets the upstream request.
Decisions are paced: a new one runs only once every evicted stream has ended (or
``confirmation_timeout_s`` passed) and ``confirmation_grace_s`` has elapsed since, so the
saturation signal has seen the freed capacity before more is taken.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

__all__ = [
    "EVICTED_REASON",
    "EvictionFilterPolicy",
    "EvictionItem",
    "EvictionOrderingPolicy",
    "EvictionQueue",
    "PriorityThenTimeEvictionOrdering",
    "RequestEvictor",
    "SheddableEvictionFilter",
]

log = logging.getLogger(__name__)

# llm-d's dropped reason for a request killed after dispatch.
EVICTED_REASON = "evicted"
DEFAULT_MAX_REVOCATIONS = 2
DEFAULT_CONFIRMATION_TIMEOUT_S = 10.0
# The concurrency detector counts a request out when its stream ends: the freed
# capacity is visible at once, so only scheduling jitter needs covering.
LEADING_SENSOR_GRACE_S = 0.01
# Scraped sensors see it after the engine reclaimed it and a fresh scrape landed.
ENGINE_RECLAIM_BUDGET_S = 0.25

_SEQ = itertools.count()


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(eq=False)
class EvictionItem:
    request_id: str
    priority: int
    target: str
    dispatched: float = field(default_factory=time.monotonic)
    seq: int = field(default_factory=lambda: next(_SEQ))
    # Set when evicted; the request's ext_proc stream waits on it.
    signal: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""


class EvictionFilterPolicy:
    type_name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = _NoParams

    def __init__(self, params: BaseModel | None = None, name: str | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.name = name or self.type_name

    def accept(self, item: EvictionItem) -> bool:
        raise NotImplementedError


class SheddableEvictionFilter(EvictionFilterPolicy):
    """Only sheddable requests (priority < 0) may be evicted."""

    type_name = "sheddable-eviction-filter"

    def accept(self, item: EvictionItem) -> bool:
        return item.priority < 0


class EvictionOrderingPolicy:
    type_name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = _NoParams

    def __init__(self, params: BaseModel | None = None, name: str | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.name = name or self.type_name

    def key(self, item: EvictionItem) -> tuple[float, float, int]:
        """Lowest key is evicted first."""
        raise NotImplementedError


class PriorityThenTimeEvictionOrdering(EvictionOrderingPolicy):
    """Lowest priority first; among equals the newest dispatch (least sunk work)."""

    type_name = "priority-then-time-eviction-order-policy"

    def key(self, item: EvictionItem) -> tuple[float, float, int]:
        return (float(item.priority), -item.dispatched, -item.seq)


class EvictionQueue:
    """Tracked in-flight requests; the evictable ones in a heap (stale entries are
    dropped lazily)."""

    def __init__(self, ordering: EvictionOrderingPolicy, filter_: EvictionFilterPolicy) -> None:
        self.ordering = ordering
        self.filter = filter_
        self._in_flight: dict[str, EvictionItem] = {}
        self._evictable: dict[str, EvictionItem] = {}
        self._heap: list[tuple[tuple[float, float, int], int, EvictionItem]] = []

    def track(self, item: EvictionItem) -> bool:
        """Track ``item``; True when the filter makes it evictable."""
        self.untrack(item.request_id)
        self._in_flight[item.request_id] = item
        if not self.filter.accept(item):
            return False
        self._evictable[item.request_id] = item
        heapq.heappush(self._heap, (self.ordering.key(item), item.seq, item))
        return True

    def untrack(self, request_id: str) -> EvictionItem | None:
        self._evictable.pop(request_id, None)
        item = self._in_flight.pop(request_id, None)
        if len(self._heap) > 2 * len(self._evictable) + 16:
            self._heap = [e for e in self._heap if self._live(e[2])]
            heapq.heapify(self._heap)
        return item

    def _live(self, item: EvictionItem) -> bool:
        return self._evictable.get(item.request_id) is item

    def _top(self) -> EvictionItem | None:
        while self._heap and not self._live(self._heap[0][2]):
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

    def peek(self) -> EvictionItem | None:
        return self._top()

    def pop(self) -> EvictionItem | None:
        item = self._top()
        if item is None:
            return None
        heapq.heappop(self._heap)
        self._evictable.pop(item.request_id, None)
        self._in_flight.pop(item.request_id, None)
        return item

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def evictable(self) -> int:
        return len(self._evictable)


@dataclass
class _Revocation:
    issued: float


class RequestEvictor:
    def __init__(
        self,
        ordering: EvictionOrderingPolicy | None = None,
        filter_: EvictionFilterPolicy | None = None,
        *,
        max_revocations: int = DEFAULT_MAX_REVOCATIONS,
        confirmation_grace_s: float = ENGINE_RECLAIM_BUDGET_S,
        confirmation_timeout_s: float = DEFAULT_CONFIRMATION_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        on_revocations: Callable[[int, str], None] | None = None,
    ) -> None:
        self.queue = EvictionQueue(
            ordering or PriorityThenTimeEvictionOrdering(), filter_ or SheddableEvictionFilter()
        )
        self.max_revocations = max_revocations
        self.confirmation_grace_s = confirmation_grace_s
        self.confirmation_timeout_s = confirmation_timeout_s
        self._clock = clock
        # (count, outcome) for issued / confirmed / timed_out revocations.
        self._on_revocations = on_revocations
        self._outstanding: dict[str, _Revocation] = {}
        self._cooling: list[float] = []  # expiry times
        self.evicted_total = 0

    # -- tracking ---------------------------------------------------------------------

    def track(self, request_id: str, priority: int, target: str) -> EvictionItem | None:
        """Track a dispatched request; returns its item when it may be evicted."""
        if not request_id:
            return None
        item = EvictionItem(request_id, priority, target, dispatched=self._clock())
        return item if self.queue.track(item) else None

    def untrack(self, request_id: str) -> None:
        """The request's stream ended (completed, cancelled or evicted)."""
        self.queue.untrack(request_id)
        revocation = self._outstanding.pop(request_id, None)
        if revocation is not None:
            self._cooling.append(self._clock() + self.confirmation_grace_s)
            self._count(1, "confirmed")

    # -- decisions --------------------------------------------------------------------

    def gate_open(self, now: float) -> bool:
        for request_id, r in list(self._outstanding.items()):
            if now - r.issued >= self.confirmation_timeout_s:
                del self._outstanding[request_id]
                self._cooling.append(now + self.confirmation_grace_s)
                self._count(1, "timed_out")
                log.info("eviction of request %s not confirmed in time", request_id)
        self._cooling = [t for t in self._cooling if t > now]
        return not self._outstanding and not self._cooling

    def victim_priority(self) -> int | None:
        item = self.queue.peek()
        return item.priority if item is not None else None

    def evict_n(self, n: int, priority_bound: int) -> list[str]:
        """Evict up to ``n`` victims in order, stopping at the first whose priority is
        not strictly below ``priority_bound``."""
        evicted: list[str] = []
        now = self._clock()
        for _ in range(n):
            item = self.queue.peek()
            if item is None or item.priority >= priority_bound:
                break
            self.queue.pop()
            item.reason = EVICTED_REASON
            item.signal.set()
            self._outstanding[item.request_id] = _Revocation(now)
            evicted.append(item.request_id)
        if evicted:
            self.evicted_total += len(evicted)
            log.info("evicted in-flight requests %s", ", ".join(evicted))
        return evicted

    def reclaim(self, saturation: float, ceiling: float, demand_priority: int) -> list[str]:
        """One sizing decision for a band blocked at ``ceiling``: the deficit over the
        mean footprint of a request in flight, at least one, capped."""
        now = self._clock()
        if not self.gate_open(now):
            return []
        victim = self.victim_priority()
        if victim is None or victim >= demand_priority:
            return []
        in_flight, evictable = self.queue.in_flight, self.queue.evictable
        if in_flight <= 0 or evictable <= 0 or saturation <= 0:
            return []
        credit = saturation / in_flight
        n = max(1, math.ceil((saturation - ceiling) / credit))
        n = min(n, self.max_revocations, evictable)
        evicted = self.evict_n(n, demand_priority)
        if evicted and self._on_revocations is not None:
            self._on_revocations(len(evicted), f"issued:{demand_priority}")
        return evicted

    def _count(self, n: int, outcome: str) -> None:
        if self._on_revocations is not None:
            self._on_revocations(n, outcome)
