"""active-request-scorer: fewer in-flight requests (counted by the EPP itself) is better.

The counts come from the decisions this EPP made: +1 on every chosen endpoint when a
decision is made, -1 on the prefill (and encoders) when the response starts and on
the decode endpoint when the request ends, through the ``Decision`` hooks. A request
whose hooks never run (a bug elsewhere) stops counting after ``requestTimeout``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.durations import PositiveSeconds
from epp.datastore import Endpoint
from epp.plugins.base import PluginParams, Release, RequestTracker, Scorer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState
from epp.scheduling.result import SchedulingResult

__all__ = ["ActiveRequestScorer"]


@dataclass(slots=True)
class _InFlight:
    expires: float
    # Keys still counted; None once released.
    early: list[str] | None
    decode: list[str] | None


@register
class ActiveRequestScorer(Scorer, RequestTracker):
    """(max - n) / max over the candidates' in-flight counts; 1 when all are idle."""

    type_name = "active-request-scorer"

    class Params(PluginParams):
        # Seconds, or a duration string like "2m".
        request_timeout: PositiveSeconds = 120.0

    params: Params

    def __init__(
        self,
        params: Params | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(params, name)
        self.in_flight: dict[str, int] = {}
        self._clock = clock
        # Outstanding requests in expiry order (the timeout is the same for all), so
        # expiry pops from the front and a normal release deletes by id, both O(1).
        self._outstanding: OrderedDict[int, _InFlight] = OrderedDict()
        self._next_id = 0

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        self._expire()
        get = self.in_flight.get
        counts = [get(ep.key, 0) for ep in endpoints]
        hi = max(counts)
        if hi == 0:
            return [1.0] * len(counts)
        return [(hi - c) / hi for c in counts]

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        self._expire()
        decode = [ep.key for ep in result.targets(result.primary)[:1]]
        early = [ep.key for ep in result.targets(result.prefill_profile)[:1]]
        early += [ep.key for ep in result.targets(result.encode_profile)]
        for key in decode + early:
            self.in_flight[key] = self.in_flight.get(key, 0) + 1
        rid = self._next_id
        self._next_id += 1
        record = _InFlight(self._clock() + self.params.request_timeout, early, decode)
        self._outstanding[rid] = record

        def release_early() -> None:
            self._release(rid, record, early=True)

        def release_decode() -> None:
            self._release(rid, record, early=False)

        return release_early, release_decode

    def _release(self, rid: int, record: _InFlight, *, early: bool) -> None:
        keys = record.early if early else record.decode
        if keys is None:
            return  # idempotent
        if early:
            record.early = None
        else:
            record.decode = None
        for key in keys:
            n = self.in_flight.get(key, 0) - 1
            if n > 0:
                self.in_flight[key] = n
            else:
                self.in_flight.pop(key, None)
        if record.early is None and record.decode is None:
            self._outstanding.pop(rid, None)

    def _expire(self) -> None:
        now = self._clock()
        outstanding = self._outstanding
        while outstanding:
            rid, record = next(iter(outstanding.items()))
            if record.expires > now:
                break
            self._release(rid, record, early=True)
            self._release(rid, record, early=False)
            outstanding.pop(rid, None)

    def outstanding(self) -> int:
        """Requests counted and not yet released (for tests and debugging)."""
        return len(self._outstanding)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        for ep in removed:
            self.in_flight.pop(ep.key, None)
