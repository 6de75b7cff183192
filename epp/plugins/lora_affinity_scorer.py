"""lora-affinity-scorer: prefer endpoints that have the requested LoRA adapter loaded.

From ``vllm:lora_requests_info`` (running and waiting adapters, ``max_lora``), for the
request's model: 1.0 when the adapter is running on the endpoint; 0.8 when it is not
but the endpoint has room for another adapter (running + waiting < ``max_lora``); 0.6
when it is waiting to load there; else 0. A stale endpoint has no adapters and no room.
No parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.plugins.base import Scorer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["LoraAffinityScorer"]


@register
class LoraAffinityScorer(Scorer):
    type_name = "lora-affinity-scorer"

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        model = cycle.request.model
        out = []
        for ep in endpoints:
            m = cycle.signals(ep)
            if model in m.running_loras:
                out.append(1.0)
            elif len(set(m.running_loras)) + len(set(m.waiting_loras)) < (m.max_lora or 0):
                out.append(0.8)
            elif model in m.waiting_loras:
                out.append(0.6)
            else:
                out.append(0.0)
        return out
