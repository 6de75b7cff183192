"""Each flow-control policy against llm-d's documented behaviour."""

from __future__ import annotations

import math

import pytest

from epp.datastore import ROLE_LABEL, Endpoint, EndpointMetrics
from epp.flowcontrol.admitters import ProbabilisticAdmitter, ProbabilisticParams, shed_probability
from epp.flowcontrol.fairness import (
    GlobalStrictFairness,
    ProgramAwareFairness,
    ProgramAwareParams,
    RoundRobinFairness,
    las_pick,
)
from epp.flowcontrol.item import FlowItem, FlowKey
from epp.flowcontrol.ledger import EndpointLoad, InflightLedger
from epp.flowcontrol.ordering import EdfOrdering, FcfsOrdering, SloDeadlineOrdering
from epp.flowcontrol.quantity import parse_quantity
from epp.flowcontrol.queues import Band
from epp.flowcontrol.saturation import (
    ConcurrencyDetector,
    ConcurrencyParams,
    UtilizationDetector,
    UtilizationParams,
    concurrency_admits,
    stage_saturation,
)
from epp.flowcontrol.usage_limits import (
    HoldbackParams,
    PriorityHoldback,
    StaticParams,
    StaticUsageLimit,
    holdback_ceilings,
    reflective_ceilings,
)

NOW = 1000.0


def ep(
    name: str, waiting: float = 0, kv: float = 0, *, role: str | None = None, fresh: bool = True
) -> Endpoint:
    labels = {ROLE_LABEL: role} if role else {}
    return Endpoint(
        name,
        "10.0.0." + str(abs(hash(name)) % 200 + 1),
        8000,
        labels=labels,
        metrics=EndpointMetrics(waiting=waiting, kv_usage=kv, updated_at=NOW if fresh else 0.0),
    )


def item(fid: str = "f", prio: int = 0, enq: float = 0.0, **kw: object) -> FlowItem:
    it = FlowItem(FlowKey(fid, prio), **kw)  # type: ignore[arg-type]
    it.enqueued = enq
    it.received = kw.get("received", enq)  # type: ignore[assignment]
    return it


# -- quantities ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"), [("100", 100), ("1k", 1000), ("1Gi", 2**30), ("500M", 500 * 10**6), (7, 7)]
)
def test_quantities(text: str | int, value: int) -> None:
    assert parse_quantity(text) == value


def test_bad_quantity_names_the_value() -> None:
    with pytest.raises(ValueError, match="'lots'"):
        parse_quantity("lots")


# -- saturation ---------------------------------------------------------------------


def test_utilization_is_the_average_roofline_and_stale_counts_as_saturated() -> None:
    d = UtilizationDetector(UtilizationParams(queueDepthThreshold=4, kvCacheUtilThreshold=0.5))
    ledger = InflightLedger()
    # max(2/4, 0.1/0.5) = 0.5 and max(0/4, 0.4/0.5) = 0.8 -> 0.65
    assert d.saturation([ep("a", 2, 0.1), ep("b", 0, 0.4)], NOW, ledger, pending=False) == (
        pytest.approx(0.65)
    )
    assert d.saturation([ep("a"), ep("s", fresh=False)], NOW, ledger, pending=False) == 0.5
    assert d.stale_endpoints == 1
    assert d.saturation([], NOW, ledger, pending=False) == 1.0


def test_utilization_staleness_threshold_is_a_duration() -> None:
    assert (
        UtilizationParams.model_validate(
            {"metricsStalenessThreshold": "1s"}
        ).metricsStalenessThreshold
        == 1.0
    )
    with pytest.raises(ValueError):
        UtilizationParams.model_validate({"kvCacheUtilThreshold": 1.5})


def test_concurrency_modes() -> None:
    a, b = ep("a"), ep("b")
    ledger = InflightLedger()
    ledger.add(a.key, 500)
    ledger.add(a.key, 500)
    req = ConcurrencyDetector(ConcurrencyParams(maxConcurrency=2))
    assert req.saturation([a, b], NOW, ledger, pending=False) == 0.5  # 2 of 4
    tok = ConcurrencyDetector(ConcurrencyParams(concurrencyMode="tokens", maxTokenConcurrency=1000))
    assert tok.saturation([a, b], NOW, ledger, pending=False) == 0.5  # 1000 of 2000
    hyb = ConcurrencyDetector(
        ConcurrencyParams(concurrencyMode="hybrid", maxConcurrency=4, maxTokenConcurrency=1000)
    )
    # a: max(2/4, 1000/1000) = 1.0; b: 0 -> 0.5
    assert hyb.saturation([a, b], NOW, ledger, pending=False) == 0.5
    ledger.reserve(0)
    ledger.reserve(0)
    assert req.saturation([a, b], NOW, ledger, pending=True) == 1.0  # admitted, not yet placed


def test_concurrency_filter_role_keeps_endpoints_under_their_limit() -> None:
    load = EndpointLoad(requests=4, tokens=900)
    assert not concurrency_admits(load, ConcurrencyParams(maxConcurrency=4))
    assert concurrency_admits(load, ConcurrencyParams(maxConcurrency=4, headroom=0.25))  # 5
    tokens = ConcurrencyParams(concurrencyMode="tokens", maxConcurrency=1, maxTokenConcurrency=1000)
    assert concurrency_admits(load, tokens)  # requests ignored in token mode
    hybrid = ConcurrencyParams(concurrencyMode="hybrid", maxConcurrency=8, maxTokenConcurrency=900)
    assert not concurrency_admits(load, hybrid)  # the token limit is reached
    a, b = ep("a"), ep("b")
    det = ConcurrencyDetector(ConcurrencyParams(maxConcurrency=2))
    det.ledger = InflightLedger()
    det.ledger.add(a.key, 0)
    det.ledger.add(a.key, 0)
    det.ledger.reserve(0)  # dispatched, not placed: on no endpoint yet
    assert det.admitting([a, b]) == [b]


def test_pd_pool_is_saturated_when_its_prefill_stage_is() -> None:
    d = UtilizationDetector(UtilizationParams(queueDepthThreshold=1))
    pool = [ep("p", waiting=3, role="prefill"), ep("d", role="decode")]
    sat = stage_saturation(d, pool, NOW, InflightLedger())
    assert sat.prefill == 3.0 and sat.decode == 0.0 and sat.effective == 3.0
    mono = stage_saturation(d, [ep("x", waiting=0.5)], NOW, InflightLedger())
    assert mono.prefill is None and mono.effective == 0.5


# -- ordering -----------------------------------------------------------------------


def test_fcfs_edf_and_slo_deadline_orders() -> None:
    early, late = item(enq=1.0), item(enq=2.0)
    assert FcfsOrdering().key(early) < FcfsOrdering().key(late)
    tight = item(enq=2.0, ttl_s=1.0)  # deadline 3
    loose = item(enq=1.0, ttl_s=5.0)  # deadline 6
    none = item(enq=0.0, ttl_s=0.0)  # no deadline: last
    edf = EdfOrdering()
    assert sorted([none, loose, tight], key=edf.key) == [tight, loose, none]
    slo = SloDeadlineOrdering()
    fast = item(enq=5.0, received=5.0, slo_ttft_s=0.1)
    slow = item(enq=1.0, received=1.0, slo_ttft_s=10.0)
    no_header = item(enq=0.0, received=0.0)
    assert sorted([no_header, slow, fast], key=slo.key) == [fast, slow, no_header]
    assert slo.key(no_header)[0] == math.inf


# -- fairness -----------------------------------------------------------------------


def _band(fairness: object) -> Band:
    return Band(0, 100, 10**9, fairness, FcfsOrdering())  # type: ignore[arg-type]


def test_global_strict_takes_the_best_head_across_flows() -> None:
    band = _band(GlobalStrictFairness())
    for fid, t in (("a", 3.0), ("a", 4.0), ("b", 1.0)):
        band.flow(fid).push(item(fid, enq=t))
    q = band.fairness.select(band, NOW)
    assert q is not None and q.fairness_id == "b"


def test_round_robin_gives_each_flow_a_turn_whatever_its_volume() -> None:
    band = _band(RoundRobinFairness())
    for i in range(10):
        band.flow("flood").push(item("flood", enq=float(i)))
    band.flow("quiet").push(item("quiet", enq=100.0))
    order = []
    for _ in range(4):
        q = band.fairness.select(band, NOW)
        assert q is not None
        order.append(q.fairness_id)
        q.pop()
    assert order == ["flood", "quiet", "flood", "flood"]


def test_las_prefers_the_least_served_program_and_breaks_ties_on_head_wait() -> None:
    assert las_pick([("a", 100.0, 0.0), ("b", 0.0, 0.0)], 0.8, 0.2) == "b"
    assert las_pick([("a", 0.0, 5.0), ("b", 0.0, 1.0)], 0.8, 0.2) == "a"


def test_program_aware_charges_service_and_decays_it() -> None:
    clock = [0.0]
    pa = ProgramAwareFairness(ProgramAwareParams(lasHalfLifeSeconds=10), clock=lambda: clock[0])
    heavy = item("heavy", tokens=1000)
    pa.on_dispatch(heavy, 0.0)
    assert pa.service("heavy", 0.0) == 1000
    assert pa.service("heavy", 10.0) == pytest.approx(500)
    pa.on_finished(heavy, output_tokens=10, now=10.0)
    assert pa.service("heavy", 10.0) == pytest.approx(520)  # output weighs twice
    band = _band(pa)
    band.flow("heavy").push(item("heavy", enq=0.0))
    band.flow("light").push(item("light", enq=5.0))
    q = pa.select(band, 10.0)
    assert q is not None and q.fairness_id == "light"


# -- usage limits -------------------------------------------------------------------


def test_static_usage_limit() -> None:
    assert StaticUsageLimit(StaticParams(threshold=0.8)).ceilings(0.5, [2, 1]) == [0.8, 0.8]
    with pytest.raises(ValueError):
        StaticParams(threshold=0)


def test_priority_holdback_rank_and_value_domains() -> None:
    assert holdback_ceilings([10, 5, 0], "rank", 0.4, 1.0) == pytest.approx([1.0, 0.7, 0.4])
    assert holdback_ceilings([10, 8, 0], "value", 0.4, 0.9) == pytest.approx([0.9, 0.8, 0.4])
    policy = PriorityHoldback(HoldbackParams(minCeiling=0.5))
    assert policy.ceilings(0.9, [1]) == [1.0]
    with pytest.raises(ValueError, match="minCeiling"):
        HoldbackParams.model_validate({})


def test_soft_reflective_ceiling() -> None:
    # Band 0 is never gated below saturation 1.0.
    assert reflective_ceilings(0.2, 3, 1) == [1.0, 1.0, 1.0]
    # Saturation 0.75: band 1's ceiling 1-0.375 is reached; period round(0.75/0.25) = 3.
    opened = [reflective_ceilings(0.75, 3, t)[1] for t in range(1, 7)]
    assert opened == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert reflective_ceilings(1.2, 3, 3)[1:] == [0.0, 0.0]
    assert reflective_ceilings(0.9, 1, 1) == [1.0]


# -- admitters ----------------------------------------------------------------------


def test_probabilistic_admitter_sheds_only_sheddable_work() -> None:
    assert shed_probability(0.15, 5, 300) == pytest.approx(0.15**5 * 300)
    assert shed_probability(0.4, 5, 300) == 1.0
    adm = ProbabilisticAdmitter(ProbabilisticParams())
    hot = [ep("a", waiting=5), ep("b", kv=0.8)]  # saturation 1.0
    assert adm.admit(0, hot, NOW) is None
    assert adm.admit(-1, hot, NOW) == "rejected-saturated"
    assert adm.admit(-1, [], NOW) is None
    cold = [ep("a")]
    assert all(adm.admit(-1, cold, NOW) is None for _ in range(100))
