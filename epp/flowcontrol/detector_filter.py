"""Saturation detectors as scheduling filters (llm-d's "traffic shaper" role).

A scheduling profile may reference a ``concurrency-detector`` or ``utilization-detector``
plugin by name, as in llm-d; the profile then runs one of these adapters:

- ``ConcurrencyDetectorFilter`` keeps the candidates whose in-flight load (the EPP's own
  ledger, the one the detector gates dispatch on) is under
  ``maxConcurrency x (1 + headroom)``. No fallback: when every endpoint is at its limit
  the filter keeps none, as llm-d's does. With flow control on the dispatch gate leaves
  at least one endpoint under the limit (the pool is below ``maxConcurrency`` per
  endpoint on average when a request is dispatched), so the filter only steers.
- ``UtilizationDetectorFilter`` keeps the candidates with fresh metrics whose waiting
  queue and KV-cache usage are under the thresholds relaxed by ``headroom``; when none
  is, it keeps them all (fail-open), as llm-d's does.

``as_filter`` gives the adapter for a detector (None for a detector without the role).
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.flowcontrol.saturation import (
    ConcurrencyDetector,
    SaturationDetector,
    UtilizationDetector,
)
from epp.plugins.base import Filter
from epp.scheduling.cycle import CycleState

__all__ = ["ConcurrencyDetectorFilter", "UtilizationDetectorFilter", "as_filter"]


class ConcurrencyDetectorFilter(Filter):
    type_name = ConcurrencyDetector.type_name

    def __init__(self, detector: ConcurrencyDetector) -> None:
        super().__init__(None, detector.name)
        self.detector = detector

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        return self.detector.admitting(endpoints)


class UtilizationDetectorFilter(Filter):
    type_name = UtilizationDetector.type_name

    def __init__(self, detector: UtilizationDetector) -> None:
        super().__init__(None, detector.name)
        self.detector = detector

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        return self.detector.admitting(endpoints, cycle.now)


def as_filter(detector: SaturationDetector) -> Filter | None:
    if isinstance(detector, ConcurrencyDetector):
        return ConcurrencyDetectorFilter(detector)
    if isinstance(detector, UtilizationDetector):
        return UtilizationDetectorFilter(detector)
    return None
