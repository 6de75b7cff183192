"""queue-scorer: shorter waiting queue is better, min-max normalised."""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.plugins.base import Scorer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["QueueScorer"]


@register
class QueueScorer(Scorer):
    """(max - q) / (max - min) over the candidates' waiting queues; 1 when all equal."""

    type_name = "queue-scorer"

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        queues = [cycle.signals(ep).waiting for ep in endpoints]
        lo = min(queues)
        hi = max(queues)
        if hi == lo:
            return [1.0] * len(queues)
        span = hi - lo
        return [(hi - q) / span for q in queues]
