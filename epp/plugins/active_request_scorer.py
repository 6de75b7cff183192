"""active-request-scorer: fewer in-flight requests (counted by the EPP itself) is better.

The counts come from the decisions this EPP made: +1 on every chosen endpoint when a
decision is made, -1 on the prefill (and encoders) when the response starts and on
the decode endpoint when the request ends, through the ``Decision`` hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.plugins.base import PluginParams, Release, RequestTracker, Scorer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState
from epp.scheduling.result import SchedulingResult

__all__ = ["ActiveRequestScorer"]


@register
class ActiveRequestScorer(Scorer, RequestTracker):
    """(max - n) / max over the candidates' in-flight counts; 1 when all are idle."""

    type_name = "active-request-scorer"

    def __init__(self, params: PluginParams | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.in_flight: dict[str, int] = {}

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        get = self.in_flight.get
        counts = [get(ep.key, 0) for ep in endpoints]
        hi = max(counts)
        if hi == 0:
            return [1.0] * len(counts)
        return [(hi - c) / hi for c in counts]

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        decode = [ep.key for ep in result.targets(result.primary)[:1]]
        early = [ep.key for ep in result.targets(result.prefill_profile)[:1]]
        early += [ep.key for ep in result.targets(result.encode_profile)]
        for key in decode + early:
            self.in_flight[key] = self.in_flight.get(key, 0) + 1
        return self._releaser(early), self._releaser(decode)

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
