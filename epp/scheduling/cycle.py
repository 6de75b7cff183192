"""Per-request scheduling state shared between the plugins of one scheduling cycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from epp.datastore import Endpoint, EndpointMetrics
from epp.request import ParsedRequest

__all__ = ["PEER_ENDPOINT", "REQUEST_HEADERS", "RESPONSE_HEADERS", "CycleState", "StateKey"]

T = TypeVar("T")


class StateKey(Generic[T]):
    """A typed key into ``CycleState``; one module-level instance per kind of data."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StateKey({self.name!r})"


@dataclass(slots=True)
class CycleState:
    """Everything one scheduling cycle knows: the request, the clock, plugin data."""

    request: ParsedRequest
    now: float
    staleness_threshold_s: float
    _data: dict[StateKey[Any], Any] = field(default_factory=dict)

    def get(self, key: StateKey[T]) -> T | None:
        return cast("T | None", self._data.get(key))

    def put(self, key: StateKey[T], value: T) -> None:
        self._data[key] = value

    def signals(self, endpoint: Endpoint) -> EndpointMetrics:
        """The endpoint's metrics, pessimistic when stale (stale never looks idle)."""
        return endpoint.signals(self.now, self.staleness_threshold_s)


# Published by the disaggregating profile handler before it runs the second stage: the
# endpoint the first stage chose, for plugins that compare candidates with it.
PEER_ENDPOINT: StateKey[Endpoint] = StateKey("peer-endpoint")
# Response headers plugins ask the gateway to add (e.g. a session token).
RESPONSE_HEADERS: StateKey[dict[str, str]] = StateKey("response-headers")
# Request headers plugins ask the gateway to set on the routed request.
REQUEST_HEADERS: StateKey[dict[str, str]] = StateKey("request-headers")
