"""The request-management sections of the config, and llm-d's three configs that use
them, loaded unchanged and run against their documented behaviour."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from epp.config import ConfigError, load_config
from epp.datastore import Endpoint, EndpointMetrics
from epp.flowcontrol.admitters import ProbabilisticAdmitter
from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.errors import SaturatedDropped
from epp.flowcontrol.fairness import ProgramAwareFairness, RoundRobinFairness
from epp.flowcontrol.item import FlowItem, FlowKey, Outcome
from epp.flowcontrol.ordering import EdfOrdering
from epp.flowcontrol.saturation import ConcurrencyDetector, UtilizationDetector
from epp.flowcontrol.usage_limits import PriorityHoldback, SoftReflectiveCeiling
from epp.request import parse_request
from epp.requestmgmt.manager import RequestManager
from epp.requestmgmt.objects import ObjectStore, parse_object
from epp.scheduling.cycle import CycleState

CONFIGS = Path("/work/shared/llm-d/configs/llm-d-router")
if not CONFIGS.exists():  # the checkout's copy
    CONFIGS = Path(__file__).resolve().parents[3] / "shared/llm-d/configs/llm-d-router"

HEAD = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: max-score-picker
"""
PROFILES = """\
schedulingProfiles:
- name: default
  plugins: [{pluginRef: max-score-picker}]
"""


def cfg(body: str, plugins: str = "") -> str:
    return HEAD + plugins + PROFILES + body


def hot(n: int = 2, waiting: float = 5.0) -> list[Endpoint]:
    now = time.monotonic() + 3600  # fresh for the test's duration
    return [
        Endpoint(
            f"e{i}",
            f"10.0.0.{i + 1}",
            8000,
            metrics=EndpointMetrics(waiting=waiting, updated_at=now),
        )
        for i in range(n)
    ]


def test_full_flow_control_section() -> None:
    c = load_config(
        cfg(
            """\
featureGates: [flowControl]
flowControl:
  maxRequests: 1k
  maxBytes: 1Gi
  defaultRequestTTL: 30s
  noEndpointRequestTTL: 5m
  usageLimitPolicyPluginRef: holdback
  saturationDetector: {pluginRef: concurrency-detector}
  defaultPriorityBand: {maxRequests: 50}
  defaultNegativePriorityBand: {maxRequests: "10", fairnessPolicyRef: round-robin-fairness-policy}
  priorityBands:
  - {priority: 100, orderingPolicyRef: edf-ordering-policy, maxBytes: 1M}
""",
            "- type: priority-holdback-policy\n  name: holdback\n  parameters: {minCeiling: 0.4}\n"
            "- type: round-robin-fairness-policy\n- type: edf-ordering-policy\n",
        )
    )
    fc = c.flow_control
    assert fc.enabled
    assert isinstance(fc.detector, ConcurrencyDetector)  # injected with its defaults
    assert isinstance(fc.usage_limit, PriorityHoldback)
    ctl = fc.controller
    assert (ctl.max_requests, ctl.max_bytes) == (1000, 2**30)
    assert (ctl.default_ttl_s, ctl.no_endpoint_ttl_s) == (30.0, 300.0)
    assert ctl.band_spec(100).max_bytes == 10**6
    assert isinstance(ctl.band_spec(100).ordering, EdfOrdering)
    assert ctl.band_spec(7).max_requests == 50
    neg = ctl.band_spec(-3)
    assert neg.max_requests == 10 and isinstance(neg.fairness, RoundRobinFairness)


def test_no_endpoint_ttl_follows_the_default_ttl() -> None:
    c = load_config(cfg("featureGates: [flowControl]\nflowControl: {defaultRequestTTL: 2s}\n"))
    assert c.flow_control.controller.no_endpoint_ttl_s == 2.0
    assert load_config(cfg("")).flow_control.controller.default_ttl_s == 60.0


@pytest.mark.parametrize(
    ("body", "plugins", "message"),
    [
        (
            "",
            "- type: latency-slo-admitter\n  parameters: {latencyPredictionInfoProducerName: x}\n",
            "latencyPredictionInfoProducerName: 'x' is not a predicted-latency-producer",
        ),
        ("flowControl: {enableEviction: maybe}\n", "", "enableEviction"),
        ("flowControl: {usageLimitPolicyPluginRef: nope}\n", "", "usageLimitPolicyPluginRef.*nope"),
        ("flowControl: {defaultRequestTTL: soon}\n", "", "defaultRequestTTL"),
        ("flowControl: {maxRequests: many}\n", "", "maxRequests"),
        ("flowControl: {surprise: 1}\n", "", "flowControl.surprise"),
        (
            "flowControl: {priorityBands: [{priority: 1, fairnessPolicyRef: fcfs-ordering-policy}]}\n",
            "",
            "is not a FairnessPolicy",
        ),
        (
            "",
            "- type: utilization-detector\n  parameters: {queueDepthThreshold: 0}\n",
            "queueDepthThreshold",
        ),
        ("", "- type: soft-reflective-ceiling-policy\n  parameters: {x: 1}\n", "parameters.x"),
        ("featureGates: ['flowControl=maybe']\n", "", "true or false"),
        (
            "",
            "- type: utilization-detector\n  parameters: {headroom: -0.2}\n",
            "parameters.headroom",
        ),
    ],
)
def test_refusals_name_the_field(body: str, plugins: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(cfg(body, plugins))


def test_gate_forms() -> None:
    assert not load_config(cfg("featureGates: ['flowControl=false']\n")).flow_control.enabled
    assert load_config(cfg("featureGates: {flowControl: true}\n")).flow_control.enabled
    assert not load_config(cfg("")).flow_control.enabled


# -- llm-d's configs ------------------------------------------------------------------


async def test_probabilistic_admitter_config_sheds_sheddable_under_load() -> None:
    c = load_config(config_file=str(CONFIGS / "probabilistic-admitter-epp-config.yaml"))
    fc = c.flow_control
    assert not fc.enabled
    [admitter] = fc.admitters
    assert isinstance(admitter, ProbabilisticAdmitter)
    det = fc.detector
    assert isinstance(det, UtilizationDetector) and det.params.queueDepthThreshold == 999999999
    store = ObjectStore()
    store.replace(
        "file",
        [
            parse_object(
                {
                    "kind": "InferenceObjective",
                    "metadata": {"name": "batch"},
                    "spec": {"priority": -1, "poolRef": {"name": "p"}},
                }
            )
        ],
    )
    manager = RequestManager(fc, store, hot)  # saturation 1.0 by the admitter's thresholds
    kw = dict(model="m", target_model="m", byte_size=1, tokens=1, request_id="r", received=0.0)
    with pytest.raises(SaturatedDropped):
        await manager.admit({"x-llm-d-inference-objective": "batch"}, **kw)  # type: ignore[arg-type]
    await manager.admit({}, **kw)  # type: ignore[arg-type]


class Pool:
    """Endpoints whose load the test sets."""

    def __init__(self, waiting: float) -> None:
        self.endpoints = hot(1, waiting)

    def set(self, waiting: float) -> None:
        self.endpoints = hot(1, waiting)

    def __call__(self) -> list[Endpoint]:
        return self.endpoints


async def _queue(
    ctl: FlowController, keys: list[FlowKey]
) -> tuple[list[FlowItem], list[asyncio.Task[str]]]:
    items = [FlowItem(k) for k in keys]
    tasks = [asyncio.create_task(ctl.enqueue_and_wait(it)) for it in items]
    await asyncio.sleep(0)
    assert ctl.queued == len(items)
    return items, tasks


async def test_soft_reflective_ceiling_config_throttles_the_lower_band() -> None:
    c = load_config(config_file=str(CONFIGS / "soft-reflective-ceiling-epp-config.yaml"))
    fc = c.flow_control
    assert fc.enabled and isinstance(fc.usage_limit, SoftReflectiveCeiling)
    pool = Pool(waiting=10.0)  # saturated: everything queues
    ctl = FlowController(fc.controller, fc.detector, pool, usage_limit=fc.usage_limit)
    ctl._running = True  # cycles driven by the test, not the dispatch task
    items, tasks = await _queue(ctl, [FlowKey("f", p) for _ in range(30) for p in (10, 0)])
    # Utilization 0.75 (queue 3.75 of 5): the top band always dispatches, the lower one
    # about one cycle in three (period round(0.75 / 0.25)).
    pool.set(3.75)
    for _ in range(45):
        ctl.dispatch_once()
    top = sum(1 for it in items if it.key.priority == 10 and it.outcome == Outcome.DISPATCHED)
    low = sum(1 for it in items if it.key.priority == 0 and it.outcome == Outcome.DISPATCHED)
    assert top == 30
    assert 3 <= low <= 8
    await ctl.stop()
    await asyncio.gather(*tasks)


async def test_program_aware_config_serves_the_least_served_program_first() -> None:
    c = load_config(config_file=str(CONFIGS / "sim-program-aware-config.yaml"))
    fc = c.flow_control
    fairness = fc.controller.default_band.fairness
    assert fc.enabled and isinstance(fairness, ProgramAwareFairness)
    pool = Pool(waiting=10.0)
    ctl = FlowController(fc.controller, fc.detector, pool)
    ctl._running = True
    fairness.on_dispatch(FlowItem(FlowKey("heavy", 0), tokens=10_000), time.monotonic())
    (heavy, light), tasks = await _queue(ctl, [FlowKey("heavy", 0), FlowKey("light", 0)])
    pool.set(0.0)
    assert ctl.dispatch_once()
    assert light.outcome == Outcome.DISPATCHED and heavy.outcome is None
    await ctl.stop()
    await asyncio.gather(*tasks)


FILTER_PROFILE = """\
plugins:
- type: max-score-picker
- type: concurrency-detector
  parameters: {maxConcurrency: 2, headroom: 0.5}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: concurrency-detector}, {pluginRef: max-score-picker}]
featureGates: [flowControl]
"""


async def test_a_profile_uses_the_concurrency_detector_as_a_filter_on_the_admission_ledger() -> (
    None
):
    c = load_config("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n" + FILTER_PROFILE)
    fc = c.flow_control
    assert isinstance(fc.detector, ConcurrencyDetector)
    (flt,) = c.scheduler.profiles["default"].filters
    pool = [Endpoint(f"e{i}", f"10.0.0.{i + 1}", 8000) for i in range(2)]
    cycle = CycleState(
        parse_request("/v1/completions", {}, b'{"model":"m","prompt":"p"}'), 0.0, 1.0
    )
    assert list(flt.filter(cycle, pool)) == pool  # no ledger bound yet: nothing removed
    manager = RequestManager(fc, ObjectStore(), lambda: pool)
    assert fc.detector.ledger is manager.ledger
    # Limit: 2 x (1 + 0.5) = 3 in flight per endpoint.
    for _ in range(3):
        manager.ledger.add(pool[0].key, 0)
    manager.ledger.add(pool[1].key, 0)
    assert list(flt.filter(cycle, pool)) == [pool[1]], "the full endpoint is filtered out"
    manager.ledger.remove(pool[0].key, 0)
    assert list(flt.filter(cycle, pool)) == pool
