"""In-flight eviction: the policies, the tracking queue, the evictor's decisions, the
controller's trigger and the configuration."""

from __future__ import annotations

import asyncio

import pytest

from epp.datastore import Endpoint
from epp.flowcontrol.config import FLOW_CONTROL_TYPES, build_flow_control, build_plugin
from epp.flowcontrol.controller import ControllerConfig, FlowController
from epp.flowcontrol.eviction import (
    EVICTED_REASON,
    LEADING_SENSOR_GRACE_S,
    EvictionItem,
    EvictionQueue,
    PriorityThenTimeEvictionOrdering,
    RequestEvictor,
    SheddableEvictionFilter,
)
from epp.flowcontrol.item import FlowItem, FlowKey, Outcome
from epp.flowcontrol.saturation import ConcurrencyDetector, ConcurrencyParams
from tests.epp_gateway.pool import wait_until


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _item(rid: str, priority: int, dispatched: float) -> EvictionItem:
    return EvictionItem(rid, priority, "10.0.0.1:8000", dispatched=dispatched)


def test_sheddable_filter_keeps_only_negative_priorities() -> None:
    f = SheddableEvictionFilter()
    assert f.accept(_item("a", -1, 0.0))
    assert not f.accept(_item("b", 0, 0.0))
    assert not f.accept(_item("c", 5, 0.0))


def test_ordering_lowest_priority_then_newest_dispatch() -> None:
    o = PriorityThenTimeEvictionOrdering()
    items = [_item("old-1", -1, 1.0), _item("new-1", -1, 5.0), _item("old-5", -5, 1.0)]
    ranked = sorted(items, key=o.key)
    assert [i.request_id for i in ranked] == ["old-5", "new-1", "old-1"]


def test_queue_tracks_all_but_orders_only_evictable() -> None:
    q = EvictionQueue(PriorityThenTimeEvictionOrdering(), SheddableEvictionFilter())
    assert not q.track(_item("crit", 10, 1.0))
    assert q.track(_item("b1", -1, 1.0))
    assert q.track(_item("b2", -1, 2.0))
    assert q.track(_item("b3", -3, 0.5))
    assert (q.in_flight, q.evictable) == (4, 3)
    q.untrack("b3")
    assert (q.in_flight, q.evictable) == (3, 2)
    head = q.peek()
    assert head is not None and head.request_id == "b2"
    popped = q.pop()
    assert popped is head
    assert (q.in_flight, q.evictable) == (2, 1)
    q.untrack("b1")
    assert q.pop() is None and q.peek() is None
    assert q.in_flight == 1


def test_queue_retracking_replaces_the_entry() -> None:
    q = EvictionQueue(PriorityThenTimeEvictionOrdering(), SheddableEvictionFilter())
    q.track(_item("a", -1, 1.0))
    q.track(_item("a", 3, 2.0))  # now not sheddable
    assert (q.in_flight, q.evictable) == (1, 0)
    assert q.peek() is None


def test_evict_n_stops_at_the_priority_bound_and_signals() -> None:
    clock = Clock()
    ev = RequestEvictor(clock=clock)
    low = ev.track("low", -5, "a")
    mid = ev.track("mid", -1, "a")
    assert ev.track("crit", 10, "a") is None
    assert low is not None and mid is not None
    assert ev.evict_n(5, priority_bound=-1) == ["low"]
    assert low.signal.is_set() and low.reason == EVICTED_REASON
    assert not mid.signal.is_set()
    assert ev.victim_priority() == -1


def test_reclaim_is_paced_by_confirmation_and_grace() -> None:
    clock = Clock()
    counts: list[tuple[int, str]] = []
    ev = RequestEvictor(
        clock=clock,
        confirmation_grace_s=0.5,
        confirmation_timeout_s=10.0,
        on_revocations=lambda n, o: counts.append((n, o)),
    )
    for i in range(3):
        clock.t += 1
        ev.track(f"b{i}", -1, "a")
    ev.track("c", 5, "a")
    # Saturation 1.0 at ceiling 1.0 with 4 in flight: at least one revocation.
    assert ev.reclaim(1.0, 1.0, demand_priority=5) == ["b2"]  # newest first
    assert counts == [(1, "issued:5")]
    # Outstanding: no new decision until the evicted stream ends.
    assert ev.reclaim(1.0, 1.0, 5) == []
    ev.untrack("b2")
    assert counts[-1] == (1, "confirmed")
    assert ev.reclaim(1.0, 1.0, 5) == []  # cooling
    clock.t += 0.6
    assert ev.reclaim(1.0, 1.0, 5) == ["b1"]
    # An unconfirmed eviction stops holding the gate after the timeout.
    clock.t += 10.0
    assert ev.gate_open(clock.t) is False  # timed out now, cooling starts
    assert counts[-1] == (1, "timed_out")
    clock.t += 0.6
    assert ev.gate_open(clock.t)


def test_reclaim_never_takes_a_victim_at_or_above_the_demand() -> None:
    ev = RequestEvictor(clock=Clock())
    ev.track("b", -1, "a")
    assert ev.reclaim(1.0, 1.0, demand_priority=-1) == []
    assert ev.reclaim(1.0, 1.0, demand_priority=-2) == []
    assert ev.reclaim(0.0, 1.0, demand_priority=0) == []  # nothing to reclaim from
    assert ev.reclaim(1.0, 1.0, demand_priority=0) == ["b"]


def test_reclaim_sizes_by_the_deficit_and_caps() -> None:
    ev = RequestEvictor(clock=Clock(), max_revocations=2)
    for i in range(4):
        ev.track(f"b{i}", -1, "a")
    # Saturation 2.0 over a ceiling of 1.0 with 4 in flight (0.5 each): 2 needed.
    assert len(ev.reclaim(2.0, 1.0, 0)) == 2


async def test_controller_evicts_when_a_higher_band_waits_on_saturation() -> None:
    evictor = RequestEvictor(confirmation_grace_s=0.0)
    detector = ConcurrencyDetector(ConcurrencyParams(maxConcurrency=1))
    pool = [Endpoint("a", "10.0.0.1", 8000)]
    fc = FlowController(ControllerConfig(tick_s=0.005), detector, lambda: pool, evictor=evictor)
    await fc.start()
    try:
        first = FlowItem(FlowKey("f", -1), request_id="batch")
        assert await fc.enqueue_and_wait(first) == Outcome.DISPATCHED
        fc.ledger.unreserve(0)
        fc.ledger.add(pool[0].key, 0)
        victim = evictor.track("batch", -1, pool[0].key)
        assert victim is not None
        critical = asyncio.create_task(fc.enqueue_and_wait(FlowItem(FlowKey("f", 10))))
        await asyncio.wait_for(victim.signal.wait(), 5)
        assert not critical.done(), "it waits until the victim's stream ended"
        evictor.untrack("batch")
        fc.ledger.remove(pool[0].key, 0)
        fc.finished(first)
        assert await asyncio.wait_for(critical, 5) == Outcome.DISPATCHED
        assert evictor.evicted_total == 1
    finally:
        await fc.stop()


async def test_controller_does_not_evict_for_an_equal_or_lower_band() -> None:
    evictor = RequestEvictor(confirmation_grace_s=0.0)
    detector = ConcurrencyDetector(ConcurrencyParams(maxConcurrency=1))
    pool = [Endpoint("a", "10.0.0.1", 8000)]
    fc = FlowController(ControllerConfig(tick_s=0.005), detector, lambda: pool, evictor=evictor)
    await fc.start()
    try:
        fc.ledger.add(pool[0].key, 0)
        victim = evictor.track("batch", -1, pool[0].key)
        assert victim is not None
        waiting = asyncio.create_task(fc.enqueue_and_wait(FlowItem(FlowKey("f", -1))))
        await wait_until(lambda: fc.queued == 1)
        for _ in range(10):
            fc.dispatch_once()
        assert not victim.signal.is_set()
        waiting.cancel()
    finally:
        await fc.stop()


def test_config_accepts_eviction_and_its_plugin_types() -> None:
    for name in (
        "eviction-sheddable-filter",
        "sheddable-eviction-filter",
        "eviction-priority-then-time-ordering",
        "priority-then-time-eviction-order-policy",
    ):
        assert name in FLOW_CONTROL_TYPES
    plugins = {
        "f": build_plugin(0, "eviction-sheddable-filter", "f", None),
        "o": build_plugin(1, "eviction-priority-then-time-ordering", "o", None),
        "d": build_plugin(2, "concurrency-detector", "d", {"maxConcurrency": 1}),
    }
    setup = build_flow_control(["flowControl"], {"enableEviction": True}, None, plugins)
    assert setup.eviction is not None
    assert setup.eviction.filter is plugins["f"]
    assert setup.eviction.ordering is plugins["o"]
    assert setup.eviction.confirmation_grace_s == LEADING_SENSOR_GRACE_S
    off = build_flow_control(["flowControl"], {}, None, plugins)
    assert off.eviction is None
    with pytest.raises(ValueError, match="parameters"):
        build_plugin(0, "sheddable-eviction-filter", "x", {"bogus": 1})


def test_requests_sharing_a_client_request_id_are_tracked_apart() -> None:
    from epp.decision import Decision
    from epp.flowcontrol.ledger import InflightLedger
    from epp.requestmgmt.manager import Admission

    ev = RequestEvictor(clock=Clock())
    ledger = InflightLedger()

    def admitted() -> Decision:
        # The client chose the id: another client may send the same one.
        admission = Admission(
            ledger, 10, on_end=lambda: None, priority=-1, evictor=ev, request_id="same"
        )
        decision = Decision(decode="10.0.0.1:8000")
        admission.place(decision)
        return decision

    first, second = admitted(), admitted()
    assert first.eviction is not None and second.eviction is not None
    assert first.eviction is not second.eviction
    assert ev.queue.evictable == 2
    second.release_all()  # the second request ends ...
    assert ev.queue.evictable == 1  # ... and the first is still tracked, and evictable
    first.release_all()
    assert (ev.queue.in_flight, ev.queue.evictable) == (0, 0)
