"""running-requests-size-scorer: fewer running requests (the engine's own count) is better.

(max - running) / (max - min) over the candidates; 1 for all when they are equal. A
stale endpoint counts as fully busy. No parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.plugins.base import Scorer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["RunningRequestsSizeScorer"]


@register
class RunningRequestsSizeScorer(Scorer):
    type_name = "running-requests-size-scorer"

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        running = [cycle.signals(ep).running for ep in endpoints]
        lo = min(running)
        hi = max(running)
        if hi == lo:
            return [1.0] * len(running)
        return [(hi - r) / (hi - lo) for r in running]
