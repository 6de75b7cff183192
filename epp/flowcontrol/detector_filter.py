"""The concurrency detector as a scheduling filter (llm-d's "traffic shaper" role).

A scheduling profile may reference a ``concurrency-detector`` plugin by name, as in
llm-d; the profile then runs this adapter, which keeps the candidates whose in-flight
load (the EPP's own ledger, the one the detector gates dispatch on) is under
``maxConcurrency x (1 + headroom)``. No fallback: when every endpoint is at its limit
the filter keeps none, as llm-d's does. With flow control on the dispatch gate leaves at
least one endpoint under the limit (the pool is below ``maxConcurrency`` per endpoint on
average when a request is dispatched), so the filter only steers.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.flowcontrol.saturation import ConcurrencyDetector
from epp.plugins.base import Filter
from epp.scheduling.cycle import CycleState

__all__ = ["DetectorFilter"]


class DetectorFilter(Filter):
    type_name = ConcurrencyDetector.type_name

    def __init__(self, detector: ConcurrencyDetector) -> None:
        super().__init__(None, detector.name)
        self.detector = detector

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        return self.detector.admitting(endpoints)
