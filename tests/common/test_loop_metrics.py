"""The lock-free series expose exactly what prometheus-client's own would."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from common.loop_metrics import LoopCounter, LoopGauge, LoopHistogram

BUCKETS = (0.001, 0.0025, 0.5, 1.0, 30.0)


def _exposition(registry: CollectorRegistry) -> str:
    # Creation times differ between the two registries by construction.
    return re.sub(r"(_created(?:\{[^}]*\})?) \S+", r"\1 T", generate_latest(registry).decode())


@given(
    amounts=st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.sampled_from([*BUCKETS, 0.0, -1.0]),
        ),
        max_size=30,
    ),
    counts=st.lists(
        st.tuples(st.sampled_from(["/a", "/b"]), st.integers(200, 202), st.integers(0, 3)),
        max_size=10,
    ),
    moves=st.lists(st.booleans(), max_size=10),
)
def test_the_same_exposition_as_prometheus_client(
    amounts: list[float], counts: list[tuple[str, int, int]], moves: list[bool]
) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("pd_x_seconds", "A histogram.", buckets=BUCKETS, registry=theirs)
    loop_histogram = LoopHistogram("pd_x_seconds", "A histogram.", BUCKETS, ours)
    counter = Counter("pd_y", "A counter.", ["path", "status"], registry=theirs)
    loop_counter = LoopCounter("pd_y", "A counter.", ["path", "status"], ours)
    gauge = Gauge("pd_z", "A gauge.", registry=theirs)
    loop_gauge = LoopGauge("pd_z", "A gauge.", ours)
    for amount in amounts:
        histogram.observe(amount)
        loop_histogram.observe(amount)
    for path, status, by in counts:
        counter.labels(path=path, status=str(status)).inc(by)
        loop_counter.labels(path=path, status=status).inc(by)
    for up in moves:
        (gauge.inc if up else gauge.dec)()
        (loop_gauge.inc if up else loop_gauge.dec)()
    assert _exposition(ours) == _exposition(theirs)


def test_samples_read_back_through_the_registry() -> None:
    registry = CollectorRegistry()
    histogram = LoopHistogram("pd_x_seconds", "A histogram.", BUCKETS, registry)
    counter = LoopCounter("pd_y", "A counter.", ["path"], registry)
    histogram.observe(0.2)
    histogram.observe(math.nan)
    counter.labels("/a").inc()
    assert registry.get_sample_value("pd_x_seconds_bucket", {"le": "0.5"}) == 1
    assert registry.get_sample_value("pd_x_seconds_count") == 1
    assert math.isnan(registry.get_sample_value("pd_x_seconds_sum") or 0.0)
    assert registry.get_sample_value("pd_y_total", {"path": "/a"}) == 1


def test_misuse_is_refused_by_name() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("pd_y", "A counter.", ["path", "status"], registry)
    with pytest.raises(ValueError, match="pd_y: labels"):
        counter.labels(path="/a")
    with pytest.raises(ValueError, match="pd_y: labels"):
        counter.labels("/a")
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("/a", "200").inc(-1)
    with pytest.raises(ValueError, match="pd_z_seconds: buckets"):
        LoopHistogram("pd_z_seconds", "Out of order.", (1.0, 0.5), registry)
    # A second series under a taken name is refused, as prometheus-client refuses it.
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        LoopGauge("pd_y_total", "Clashes with the counter.", registry)
