"""utilization-detector's scheduling-filter role (llm-d's traffic shaper): thresholds
relaxed by headroom, the KV limit capped at 1, stale metrics, fail-open; the saturation
role unchanged by headroom; loading from a config (declared, or the default detector
referenced by its type name)."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from epp.config import ConfigError, load_config
from epp.datastore import Endpoint, EndpointMetrics
from epp.flowcontrol.detector_filter import UtilizationDetectorFilter
from epp.flowcontrol.ledger import InflightLedger
from epp.flowcontrol.saturation import (
    UtilizationDetector,
    UtilizationParams,
    utilization_admits,
)
from epp.request import parse_request
from epp.scheduling.cycle import CycleState

NOW = 1000.0


def ep(name: str, waiting: float = 0, kv: float = 0.0, *, age: float | None = 0.0) -> Endpoint:
    """``age`` seconds since the last scrape; None: never scraped."""
    updated = 0.0 if age is None else NOW - age
    return Endpoint(
        name,
        f"10.0.0.{len(name)}",
        8000 + sum(map(ord, name)) % 1000,
        metrics=EndpointMetrics(waiting=waiting, kv_usage=kv, updated_at=updated),
    )


def detector(**params: float) -> UtilizationDetector:
    return UtilizationDetector(UtilizationParams.model_validate(params))


def kept(det: UtilizationDetector, *eps: Endpoint) -> list[str]:
    return [e.name for e in det.admitting(eps, NOW)]


def test_without_headroom_the_thresholds_are_the_limits_and_reaching_one_removes() -> None:
    det = detector()  # queue 5, KV 0.8
    eps = [ep("ok", 4, 0.79), ep("q5", 5, 0.1), ep("kv80", 0, 0.8), ep("idle")]
    assert kept(det, *eps) == ["ok", "idle"]


def test_headroom_relaxes_both_limits() -> None:
    # Limits 5 x 1.2 = 6 waiting, 0.8 x 1.2 = 0.96 KV.
    det = detector(headroom=0.2)
    eps = [
        ep("at-threshold", 5, 0.8),
        ep("in-burst", 5, 0.9),
        ep("queue-over", 6, 0.1),
        ep("kv-over", 1, 0.97),
    ]
    assert kept(det, *eps) == ["at-threshold", "in-burst"]
    assert [utilization_admits(e, NOW, det.params) for e in eps] == [True, True, False, False]


def test_the_kv_limit_is_capped_at_one() -> None:
    # 0.9 x 1.5 = 1.35, capped to 1: a full KV cache is never under the limit.
    det = detector(kvCacheUtilThreshold=0.9, headroom=0.5)
    assert kept(det, ep("almost", 0, 0.99), ep("full", 0, 1.0)) == ["almost"]
    # Queue limit 5 x 1.5 = 7.5.
    assert kept(det, ep("q7", 7), ep("q8", 8)) == ["q7"]


def test_stale_or_never_scraped_endpoints_are_removed() -> None:
    det = detector(metricsStalenessThreshold=0.2)
    eps = [ep("fresh", age=0.1), ep("stale", age=0.5), ep("never", age=None)]
    assert kept(det, *eps) == ["fresh"]
    longer = detector(metricsStalenessThreshold=1.0)
    assert kept(longer, *eps) == ["fresh", "stale"]


@pytest.mark.parametrize(
    "eps",
    [
        [ep("a", 9), ep("b", 0, 0.95)],  # every one over a limit
        [ep("a", age=5.0), ep("b", age=None)],  # every one stale
        [ep("a", 9), ep("b", age=5.0)],  # a mix of both
    ],
)
def test_when_none_qualifies_every_candidate_is_kept(eps: list[Endpoint]) -> None:
    assert kept(detector(headroom=0.1), *eps) == ["a", "b"]
    assert kept(detector(), *[]) == []


def test_headroom_leaves_the_saturation_gradient_unchanged() -> None:
    eps = [ep("a", 5, 0.4), ep("b", 0, 0.8), ep("c", age=None)]
    # max(5/5, 0.4/0.8) = 1, max(0, 1) = 1, stale = 1 -> 1; then a lighter pool.
    light = [ep("a", 1, 0.4), ep("b", 0, 0.2)]
    for det in (detector(), detector(headroom=0.5), detector(headroom=3.0)):
        assert det.saturation(eps, NOW, InflightLedger(), pending=True) == pytest.approx(1.0)
        assert det.stale_endpoints == 1
        sat = det.saturation(light, NOW, InflightLedger(), pending=True)
        assert sat == pytest.approx((0.5 + 0.25) / 2)


def test_headroom_parameter_checks(caplog: pytest.LogCaptureFixture) -> None:
    assert UtilizationParams().headroom == 0.0
    with pytest.raises(ValidationError, match="headroom"):
        UtilizationParams.model_validate({"headroom": -0.01})
    caplog.set_level(logging.WARNING, logger="epp.flowcontrol.saturation")
    detector(headroom=20.0)  # accepted, as in llm-d, with a warning that it is a fraction
    assert any("2000% burst" in r.getMessage() for r in caplog.records)
    caplog.clear()
    detector(headroom=0.5)
    assert not caplog.records


def _cycle(now: float = NOW) -> CycleState:
    return CycleState(parse_request("/v1/completions", {}, b'{"model":"m","prompt":"p"}'), now, 1.0)


HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def test_a_profile_uses_a_declared_utilization_detector_as_a_filter() -> None:
    c = load_config(
        HEAD
        + """\
featureGates: [flowControl]
plugins:
- type: utilization-detector
  name: shaper
  parameters: {queueDepthThreshold: 2, kvCacheUtilThreshold: 0.5, headroom: 0.5}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: shaper}, {pluginRef: queue-scorer}]
"""
    )
    det = c.flow_control.detector
    assert isinstance(det, UtilizationDetector) and det.name == "shaper"
    (flt,) = c.scheduler.profiles["default"].filters
    assert isinstance(flt, UtilizationDetectorFilter) and flt.detector is det
    # Limits 3 waiting, 0.75 KV; the cycle's clock decides staleness.
    eps = [ep("a", 2, 0.7), ep("b", 3), ep("c", 0, 0.75)]
    assert [e.name for e in flt.filter(_cycle(), eps)] == ["a"]
    assert [e.name for e in flt.filter(_cycle(NOW + 10), eps)] == ["a", "b", "c"]  # all stale


@pytest.mark.parametrize("gates", ["featureGates: [flowControl]\n", ""])
def test_the_default_detector_is_a_utilization_detector_a_profile_may_reference(
    gates: str,
) -> None:
    base = HEAD + gates + "plugins:\n- type: queue-scorer\n"
    c = load_config(
        base + "schedulingProfiles:\n- name: default\n  plugins: [{pluginRef: queue-scorer}]\n"
    )
    det = c.flow_control.detector
    assert c.flow_control.enabled == bool(gates)
    assert isinstance(det, UtilizationDetector)
    assert det.params == UtilizationParams()  # queue 5, KV 0.8, 200ms, headroom 0
    assert c.plugins.get("utilization-detector") is None  # no profile names it
    c = load_config(
        base
        + "schedulingProfiles:\n- name: default\n"
        + "  plugins: [{pluginRef: utilization-detector}, {pluginRef: queue-scorer}]\n"
    )
    (flt,) = c.scheduler.profiles["default"].filters
    assert isinstance(flt, UtilizationDetectorFilter)
    assert flt.detector is c.flow_control.detector
    assert [e.name for e in flt.filter(_cycle(), [ep("a", 5), ep("b", 4)])] == ["b"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ("{headroom: -0.5}", "parameters.headroom"),
        ("{kvCacheUtilThreshold: 1.5}", "parameters.kvCacheUtilThreshold"),
        ("{headroom: lots}", "parameters.headroom"),
        ("{burst: 0.2}", "parameters.burst"),
    ],
)
def test_a_bad_parameter_fails_at_load_naming_the_field(params: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_config(
            HEAD
            + f"""\
plugins:
- type: utilization-detector
  parameters: {params}
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: utilization-detector}}]
"""
        )
