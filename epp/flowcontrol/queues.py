"""Per-flow queues and priority bands. Single-threaded (the event loop's)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from epp.flowcontrol.item import FlowItem

if TYPE_CHECKING:
    from epp.flowcontrol.fairness import FairnessPolicy
    from epp.flowcontrol.ordering import OrderingPolicy

__all__ = ["Band", "FlowQueue"]


class FlowQueue:
    """One flow's waiting requests, in its ordering policy's order. Removal is lazy: a
    request that leaves early is dropped from the heap when it reaches the head."""

    __slots__ = ("_heap", "fairness_id", "live", "ordering")

    def __init__(self, fairness_id: str, ordering: OrderingPolicy) -> None:
        self.fairness_id = fairness_id
        self.ordering = ordering
        self._heap: list[tuple[tuple[float, float, int], FlowItem]] = []
        self.live = 0

    def __len__(self) -> int:
        return self.live

    def push(self, item: FlowItem) -> None:
        heapq.heappush(self._heap, (self.ordering.key(item), item))
        self.live += 1

    def _drop_done(self) -> None:
        while self._heap and self._heap[0][1].done:
            heapq.heappop(self._heap)

    def peek(self) -> FlowItem | None:
        self._drop_done()
        return self._heap[0][1] if self._heap else None

    def head_key(self) -> tuple[float, float, int] | None:
        self._drop_done()
        return self._heap[0][0] if self._heap else None

    def pop(self) -> FlowItem | None:
        self._drop_done()
        if not self._heap:
            return None
        self.live -= 1
        return heapq.heappop(self._heap)[1]

    def forget(self) -> None:
        """An item of this flow left without being popped (cancelled, expired)."""
        self.live -= 1
        if self.live == 0:
            self._heap.clear()


@dataclass
class Band:
    priority: int
    max_requests: int
    max_bytes: int
    fairness: FairnessPolicy
    ordering: OrderingPolicy
    flows: dict[str, FlowQueue] = field(default_factory=dict)
    requests: int = 0
    bytes: int = 0

    def flow(self, fairness_id: str) -> FlowQueue:
        q = self.flows.get(fairness_id)
        if q is None:
            q = self.flows[fairness_id] = FlowQueue(fairness_id, self.ordering)
        return q

    def active(self) -> list[FlowQueue]:
        return [q for q in self.flows.values() if q.live > 0]

    def prune(self, fairness_id: str) -> None:
        q = self.flows.get(fairness_id)
        if q is not None and q.live == 0:
            del self.flows[fairness_id]
