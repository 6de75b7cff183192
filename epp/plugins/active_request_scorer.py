"""active-request-scorer: fewer in-flight requests (counted by the EPP itself) is better.

The counts come from the decisions this EPP made: +1 on every chosen endpoint when a
decision is made, -1 on the prefill (and encoders) when the response starts and on
the decode endpoint when the request ends, through the ``Decision`` hooks. A request
whose hooks never run (a bug elsewhere) stops counting after ``requestTimeout``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

from pydantic import field_validator

from epp.datastore import Endpoint
from epp.plugins.base import PluginParams, Release, RequestTracker, Scorer
from epp.plugins.durations import parse_duration
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState
from epp.scheduling.result import SchedulingResult

__all__ = ["ActiveRequestScorer"]


@register
class ActiveRequestScorer(Scorer, RequestTracker):
    """(max - n) / max over the candidates' in-flight counts; 1 when all are idle."""

    type_name = "active-request-scorer"

    class Params(PluginParams):
        # Seconds, or a duration string like "2m".
        request_timeout: float = 120.0

        @field_validator("request_timeout", mode="before")
        @classmethod
        def _duration(cls, value: object) -> float:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError("requestTimeout must be a duration like '2m' or seconds")
            seconds = parse_duration(value)
            if seconds <= 0:
                raise ValueError("requestTimeout must be positive")
            return seconds

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
        # (expiry, release) in expiry order: the timeout is the same for every request.
        self._expiries: deque[tuple[float, Release]] = deque()

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
        release_early = self._releaser(early)
        release_decode = self._releaser(decode)

        def release_everything() -> None:
            release_early()
            release_decode()

        self._expiries.append((self._clock() + self.params.request_timeout, release_everything))
        return release_early, release_decode

    def _expire(self) -> None:
        now = self._clock()
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            expiries.popleft()[1]()

    def _releaser(self, keys: list[str]) -> Release:
        done = False

        def release() -> None:
            nonlocal done
            if done:
                return
            done = True
            for key in keys:
                n = self.in_flight.get(key, 0) - 1
                if n > 0:
                    self.in_flight[key] = n
                else:
                    self.in_flight.pop(key, None)

        return release

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        for ep in removed:
            self.in_flight.pop(ep.key, None)
