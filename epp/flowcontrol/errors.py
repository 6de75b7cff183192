"""Refusals of the admission path, with llm-d's status codes and dropped reasons (the
``reason`` is sent as ``x-llm-d-request-dropped-reason``)."""

from __future__ import annotations

from epp.decision import InternalError, SchedulingError
from epp.flowcontrol.item import Outcome

__all__ = [
    "AdmissionDenied",
    "Dropped",
    "NoEndpointsDropped",
    "SaturatedDropped",
    "ShuttingDown",
    "TtlExpired",
    "error_for",
]


class Dropped(SchedulingError):
    status = 429
    reason = "rejected-saturated"


class SaturatedDropped(Dropped):
    status = 429
    reason = "rejected-saturated"


class TtlExpired(Dropped):
    status = 429
    reason = "rejected-ttl-expired"


class NoEndpointsDropped(Dropped):
    status = 503
    reason = "rejected-no-endpoints"


class ShuttingDown(Dropped):
    status = 503
    reason = "rejected-shutting-down"


class AdmissionDenied(InternalError):
    """An admission plugin refused the request after flow control: llm-d answers 500."""


def error_for(outcome: str, pool_empty: bool) -> Dropped | None:
    """The refusal for a flow-control outcome; None for ``Dispatched``."""
    if outcome == Outcome.DISPATCHED:
        return None
    if outcome == Outcome.REJECTED_CAPACITY:
        return SaturatedDropped("flow control: the priority band's queue is full")
    if outcome in (Outcome.REJECTED_NO_ENDPOINTS, Outcome.EVICTED_NO_ENDPOINTS):
        return NoEndpointsDropped("no endpoints available: request timed out in queue")
    if outcome == Outcome.EVICTED_TTL:
        if pool_empty:
            return NoEndpointsDropped("request timed out in queue and no endpoints are available")
        return TtlExpired("request timed out in queue")
    return ShuttingDown("flow controller shutting down")
