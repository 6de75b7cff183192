"""active-request-scorer: fewer in-flight requests (counted by the EPP itself) is better.

The counts come from the decisions this EPP made: +1 on every chosen endpoint when a
decision is made, -1 on the prefill (and encoders) when the response starts and on
the decode endpoint when the request ends, through the ``Decision`` hooks. A request
whose hooks never run (a bug elsewhere) stops counting after ``requestTimeout``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from common.durations import PositiveSeconds
from epp.datastore import Endpoint
from epp.plugins.base import PluginParams, Release, RequestTracker, Scorer
from epp.plugins.charges import Charges
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
        request_timeout: PositiveSeconds = 120.0

    params: Params

    def __init__(
        self,
        params: Params | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(params, name)
        self._charges = Charges(self.params.request_timeout, clock)

    @property
    def in_flight(self) -> dict[str, int]:
        """Endpoint key -> requests in flight there (absent: none)."""
        return self._charges.totals

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        self._charges.expire()
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
        charges = self._charges
        early_id = charges.charge(early)
        decode_id = charges.charge(decode)
        return (lambda: charges.release(early_id)), (lambda: charges.release(decode_id))

    def outstanding(self) -> int:
        """Charges not yet released (for tests and debugging)."""
        return len(self._charges)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        self._charges.forget({ep.key for ep in removed})
