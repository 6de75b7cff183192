"""Ordering policies: which request of one flow goes first (a sort key, lowest first)."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from epp.flowcontrol.item import FlowItem

__all__ = ["EdfOrdering", "FcfsOrdering", "OrderingPolicy", "SloDeadlineOrdering"]


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OrderingPolicy:
    type_name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = _NoParams

    def __init__(self, params: BaseModel | None = None, name: str | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.name = name or self.type_name

    def key(self, item: FlowItem) -> tuple[float, float, int]:
        raise NotImplementedError


class FcfsOrdering(OrderingPolicy):
    """Arrival order at the flow controller."""

    type_name = "fcfs-ordering-policy"

    def key(self, item: FlowItem) -> tuple[float, float, int]:
        return (item.enqueued, 0.0, item.seq)


class EdfOrdering(OrderingPolicy):
    """Earliest deadline (enqueue time + TTL) first; no TTL sorts after all deadlines."""

    type_name = "edf-ordering-policy"

    def key(self, item: FlowItem) -> tuple[float, float, int]:
        deadline = item.enqueued + item.ttl_s if item.ttl_s > 0 else math.inf
        return (deadline, item.enqueued, item.seq)


class SloDeadlineOrdering(OrderingPolicy):
    """Deadline = received + x-llm-d-slo-ttft-ms; no valid header sorts last, then FCFS."""

    type_name = "slo-deadline-ordering-policy"

    def key(self, item: FlowItem) -> tuple[float, float, int]:
        deadline = item.received + item.slo_ttft_s if item.slo_ttft_s is not None else math.inf
        return (deadline, item.received, item.seq)
