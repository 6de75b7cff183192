"""Prometheus view of the KV-event machinery, read at scrape time (nothing on the hot
path but two metric updates per request)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from epp.kv_events.pool import KvEventsPool

__all__ = ["KvEventsMetrics"]

_LOOKUP_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01)
_PREFIX = "disagg_epp_kv_events"


class _PoolCollector(Collector):
    def __init__(self, pool: KvEventsPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        c = self._pool.counters
        for name, doc, value in (
            ("messages", "KV-event messages (batches) applied.", c.messages),
            ("events", "KV events applied to the index.", c.events),
            ("gaps", "Sequence gaps detected.", c.gaps),
            ("restarts", "Publisher restarts detected.", c.restarts),
            ("replays", "Replay requests sent.", c.replays),
            ("replay_failures", "Replays that failed or came back incomplete.", c.replay_failures),
            ("dropped_engines", "Times an engine's entries were dropped.", c.dropped_engines),
            ("decode_errors", "Malformed KV-event messages.", c.decode_errors),
        ):
            yield CounterMetricFamily(f"{_PREFIX}_{name}", doc, value=value)
        index = self._pool.index
        yield GaugeMetricFamily(
            f"{_PREFIX}_index_blocks",
            "Blocks held in the index (all engines).",
            value=index.total_blocks(),
        )
        yield GaugeMetricFamily(
            f"{_PREFIX}_engines",
            "Engines whose KV events have been received.",
            value=len(index.engines()),
        )


class KvEventsMetrics:
    def __init__(self, pool: KvEventsPool, registry: CollectorRegistry) -> None:
        registry.register(_PoolCollector(pool))
        self.decisions = Counter(
            "disagg_epp_prefix_producer_decisions",
            "Scheduling decisions by the prefix producer that served them.",
            ["producer"],
            registry=registry,
        )
        self.lookup = Histogram(
            f"{_PREFIX}_lookup_duration_seconds",
            "Block hashing plus index lookup for one request.",
            buckets=_LOOKUP_BUCKETS,
            registry=registry,
        )
