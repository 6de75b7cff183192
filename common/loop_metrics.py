"""Prometheus series for a serving event loop's hot path: updated without locks.

prometheus-client guards every update with a lock; a request touches several series
(the in-flight gauge twice, a counter, up to five histograms), and on the sidecar's
JSON path those updates cost about 6% of its instructions per request. These series are
updated only from the event loop's thread, where no lock is needed, and collected by the
registry when scraped, exposed exactly as prometheus-client's ``Histogram``, ``Counter``
and ``Gauge`` expose theirs (the same samples, ``_created`` included unless
``PROMETHEUS_DISABLE_CREATED_SERIES`` says otherwise).

Only for series whose every update runs on the loop's thread: an update from another
thread could be lost.
"""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import accumulate

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

__all__ = ["CounterChild", "LoopCounter", "LoopGauge", "LoopHistogram"]

# prometheus-client's own switch for the ``_created`` series, read the way it reads it.
_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
    "true",
    "1",
    "t",
)


class LoopHistogram:
    """A histogram without labels. ``observe`` files a value under the first bucket
    whose bound is at least it, as prometheus-client does (NaN under none, but in the
    sum)."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        bounds = [float(bound) for bound in buckets]
        if bounds != sorted(bounds):
            raise ValueError(f"{name}: buckets not in increasing order")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.name = name
        self.documentation = documentation
        self._bounds = tuple(bounds)
        # Bucket bounds spelled as prometheus-client spells them ("+Inf", "0.001").
        self._labels = tuple(floatToGoString(bound) for bound in bounds)  # type: ignore[no-untyped-call]
        self._counts = [0] * len(bounds)
        self._sum = 0.0
        self._created = time.time()
        registry.register(self)

    def observe(self, amount: float) -> None:
        self._sum += amount
        if amount == amount:  # not NaN
            self._counts[bisect_left(self._bounds, amount)] += 1

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric(
            [], list(zip(self._labels, accumulate(self._counts), strict=True)), self._sum
        )
        if _CREATED:
            family.add_sample(self.name + "_created", {}, self._created)
        yield family


class CounterChild:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class LoopCounter:
    """A counter with labels; ``labels(...)`` gives the child to ``inc``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], CounterChild] = {}
        registry.register(self)

    def labels(self, *values: object, **by_name: object) -> CounterChild:
        if by_name:
            if values or set(by_name) != set(self._labelnames):
                raise ValueError(f"{self.name}: labels must be exactly {self._labelnames}")
            values = tuple(by_name[label] for label in self._labelnames)
        elif len(values) != len(self._labelnames):
            raise ValueError(f"{self.name}: labels must be exactly {self._labelnames}")
        key = tuple(str(value) for value in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = CounterChild()
        return child

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self._labelnames)
        for key, child in list(self._children.items()):
            family.add_metric(key, child.value, child.created if _CREATED else None)
        yield family


class LoopGauge:
    """A gauge without labels, moved by ``inc`` and ``dec``."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0.0
        registry.register(self)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, value=self.value)
