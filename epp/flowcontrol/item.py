"""One request waiting in (or passing through) the flow controller."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

__all__ = ["FlowItem", "FlowKey", "Outcome"]

_SEQ = itertools.count()


class Outcome:
    """llm-d's terminal outcomes (the ``outcome`` label of the flow_control_* metrics)."""

    DISPATCHED = "Dispatched"
    REJECTED_CAPACITY = "RejectedCapacity"
    REJECTED_NO_ENDPOINTS = "RejectedNoEndpoints"
    REJECTED_OTHER = "RejectedOther"
    EVICTED_TTL = "EvictedTTL"
    EVICTED_NO_ENDPOINTS = "EvictedNoEndpoints"
    EVICTED_CONTEXT_CANCELLED = "EvictedContextCancelled"
    EVICTED_OTHER = "EvictedOther"


@dataclass(frozen=True, slots=True)
class FlowKey:
    fairness_id: str
    priority: int


@dataclass(eq=False)
class FlowItem:
    key: FlowKey
    request_id: str = ""
    byte_size: int = 0
    tokens: int = 0
    model: str = ""
    target_model: str = ""
    # time.monotonic() values
    received: float = 0.0
    enqueued: float = 0.0
    # The request's TTFT objective (x-llm-d-slo-ttft-ms), seconds; None when absent.
    slo_ttft_s: float | None = None
    # The TTL in force when it was enqueued (EDF's deadline), seconds; 0 = none.
    ttl_s: float = 0.0
    seq: int = field(default_factory=lambda: next(_SEQ))
    outcome: str | None = None
    future: asyncio.Future[str] | None = None
    # Start of the current TTL budget and whether it is the no-endpoint budget.
    budget_start: float = 0.0
    budget_empty_pool: bool = False

    @property
    def done(self) -> bool:
        return self.outcome is not None
