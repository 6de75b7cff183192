"""The flow controller on its own: a fake clock, a concurrency detector, real asyncio."""

from __future__ import annotations

import asyncio

import pytest

from epp.datastore import Endpoint
from epp.flowcontrol.controller import BandSpec, ControllerConfig, FlowController
from epp.flowcontrol.fairness import RoundRobinFairness
from epp.flowcontrol.item import FlowItem, FlowKey, Outcome
from epp.flowcontrol.ledger import InflightLedger
from epp.flowcontrol.metrics import FlowControlMetrics
from epp.flowcontrol.saturation import ConcurrencyDetector, ConcurrencyParams
from epp.flowcontrol.usage_limits import HoldbackParams, PriorityHoldback
from tests.conftest import sample_sum
from tests.epp_gateway.pool import wait_until

POOL = [Endpoint("a", "10.0.0.1", 8000)]


class Rig:
    def __init__(self, config: ControllerConfig, *, capacity: int = 1, **kw: object) -> None:
        from prometheus_client import CollectorRegistry

        self.now = 0.0
        self.endpoints: list[Endpoint] = list(POOL)
        self.ledger = InflightLedger()
        self.registry = CollectorRegistry()
        self.fc = FlowController(
            config,
            ConcurrencyDetector(ConcurrencyParams(maxConcurrency=capacity)),
            lambda: self.endpoints,
            ledger=self.ledger,
            metrics=FlowControlMetrics(self.registry),
            clock=lambda: self.now,
            **kw,  # type: ignore[arg-type]
        )

    def submit(self, fid: str = "f", prio: int = 0, size: int = 10) -> asyncio.Task[str]:
        return asyncio.create_task(
            self.fc.enqueue_and_wait(FlowItem(FlowKey(fid, prio), byte_size=size))
        )

    def place(self) -> None:
        """The dispatched request reached its endpoint."""
        self.ledger.unreserve(0)
        self.ledger.add(POOL[0].key, 0)

    def finish(self) -> None:
        self.ledger.remove(POOL[0].key, 0)
        self.fc.notify()

    def count(self, outcome: str) -> float:
        return sample_sum(self.registry, "llm_d_epp_flow_control_requests_total", outcome=outcome)


async def test_dispatches_immediately_with_capacity_then_queues_in_priority_order() -> None:
    rig = Rig(ControllerConfig())
    await rig.fc.start()
    try:
        assert await rig.submit() == Outcome.DISPATCHED
        rig.place()
        low, high = rig.submit(prio=-5), None
        await wait_until(lambda: rig.fc.queued == 1)
        high = rig.submit(prio=10)
        await wait_until(lambda: rig.fc.queued == 2)
        rig.finish()
        assert await asyncio.wait_for(high, 5) == Outcome.DISPATCHED
        assert not low.done(), "the higher band goes first"
        rig.place()
        rig.finish()
        assert await asyncio.wait_for(low, 5) == Outcome.DISPATCHED
    finally:
        await rig.fc.stop()


async def test_band_capacity_rejects_at_the_boundary() -> None:
    cfg = ControllerConfig(bands={0: BandSpec(max_requests=1)})
    rig = Rig(cfg)
    await rig.fc.start()
    try:
        await rig.submit()
        rig.place()
        queued = rig.submit()
        await wait_until(lambda: rig.fc.queued == 1)
        assert await rig.submit() == Outcome.REJECTED_CAPACITY
        rig.endpoints = []
        assert await rig.submit() == Outcome.REJECTED_NO_ENDPOINTS
        queued.cancel()
    finally:
        await rig.fc.stop()


async def test_global_max_bytes() -> None:
    rig = Rig(ControllerConfig(max_bytes=15))
    await rig.fc.start()
    try:
        await rig.submit()
        rig.place()
        queued = rig.submit(size=10)
        await wait_until(lambda: rig.fc.queued == 1)
        assert await rig.submit(size=10) == Outcome.REJECTED_CAPACITY
        queued.cancel()
    finally:
        await rig.fc.stop()


async def test_ttl_and_no_endpoint_ttl() -> None:
    rig = Rig(ControllerConfig(default_ttl_s=1.0, no_endpoint_ttl_s=5.0))
    await rig.fc.start()
    try:
        await rig.submit()
        rig.place()
        waiting = rig.submit()
        await wait_until(lambda: rig.fc.queued == 1)
        rig.now = 1.5
        assert rig.fc.sweep() == 1
        assert await waiting == Outcome.EVICTED_TTL
        # An empty pool: the no-endpoint budget applies, restarting when the regime changes.
        rig.endpoints = []
        waiting = rig.submit()
        await wait_until(lambda: rig.fc.queued == 1)
        rig.now = 4.0
        assert rig.fc.sweep() == 0
        rig.now = 6.6
        assert rig.fc.sweep() == 1
        assert await waiting == Outcome.EVICTED_NO_ENDPOINTS
        assert rig.count(Outcome.EVICTED_TTL) == 1
        assert rig.count(Outcome.EVICTED_NO_ENDPOINTS) == 1
    finally:
        await rig.fc.stop()


async def test_cancelled_waiter_leaves_at_once_and_stop_ends_the_rest() -> None:
    rig = Rig(ControllerConfig())
    await rig.fc.start()
    await rig.submit()
    rig.place()
    gone, stays = rig.submit(), rig.submit()
    await wait_until(lambda: rig.fc.queued == 2)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert rig.fc.queued == 1
    assert rig.count(Outcome.EVICTED_CONTEXT_CANCELLED) == 1
    await rig.fc.stop()
    assert await stays == Outcome.EVICTED_OTHER
    assert rig.fc.queued == 0
    assert await rig.submit() == Outcome.REJECTED_OTHER


async def test_round_robin_band_alternates_flows() -> None:
    cfg = ControllerConfig(default_band=BandSpec(fairness=RoundRobinFairness()))
    rig = Rig(cfg)
    await rig.fc.start()
    try:
        await rig.submit("x")
        rig.place()
        tasks = [rig.submit("flood") for _ in range(4)]
        await wait_until(lambda: rig.fc.queued == 4)
        quiet = rig.submit("quiet")
        await wait_until(lambda: rig.fc.queued == 5)
        rig.finish()
        await wait_until(lambda: rig.fc.queued == 4)
        rig.place()
        rig.finish()
        await wait_until(lambda: rig.fc.queued == 3)
        assert quiet.done(), "the quiet flow got the second turn"
        for t in tasks:
            t.cancel()
    finally:
        await rig.fc.stop()


async def test_priority_holdback_gates_low_bands_first() -> None:
    cfg = ControllerConfig(bands={10: BandSpec(), 0: BandSpec()})
    holdback = PriorityHoldback(HoldbackParams(minCeiling=0.5))
    rig = Rig(cfg, capacity=4, usage_limit=holdback)
    await rig.fc.start()
    try:
        for _ in range(2):  # saturation 0.5: band 0's ceiling 0.5 is reached
            assert await rig.submit(prio=10) == Outcome.DISPATCHED
            rig.place()
        low = rig.submit(prio=0)
        await wait_until(lambda: rig.fc.queued == 1)
        assert await rig.submit(prio=10) == Outcome.DISPATCHED  # 0.5 < 1.0
        rig.place()
        rig.finish()
        rig.finish()  # back to 0.25
        assert await asyncio.wait_for(low, 5) == Outcome.DISPATCHED
    finally:
        await rig.fc.stop()


async def test_stale_metrics_halt_dispatch_and_requests_shed_at_ttl() -> None:
    from epp.flowcontrol.saturation import UtilizationDetector

    now = [0.0]
    stale = [Endpoint("a", "10.0.0.1", 8000)]  # never scraped
    fc = FlowController(
        ControllerConfig(default_ttl_s=2.0),
        UtilizationDetector(),
        lambda: stale,
        clock=lambda: now[0],
    )
    await fc.start()
    try:
        waiting = asyncio.create_task(fc.enqueue_and_wait(FlowItem(FlowKey("f", 100))))
        await wait_until(lambda: fc.queued == 1)
        assert not fc.dispatch_once()
        assert fc.detector.stale_endpoints == 1
        now[0] = 2.5
        assert await asyncio.wait_for(waiting, 5) == Outcome.EVICTED_TTL
    finally:
        await fc.stop()


async def test_a_flood_of_cancellations_leaves_nothing_behind() -> None:
    rig = Rig(ControllerConfig())
    await rig.fc.start()
    try:
        await rig.submit()
        rig.place()
        tasks = [rig.submit(f"t{i % 7}", prio=i % 3) for i in range(500)]
        await wait_until(lambda: rig.fc.queued == 500)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert rig.fc.queued == 0
        assert rig.count(Outcome.EVICTED_CONTEXT_CANCELLED) == 500
        assert all(not b.flows and b.requests == 0 and b.bytes == 0 for b in rig.fc._bands.values())
        assert not rig.fc._items
        rig.finish()
        assert await asyncio.wait_for(rig.submit(), 5) == Outcome.DISPATCHED
    finally:
        await rig.fc.stop()


async def test_critical_work_keeps_the_slots_held_back_from_a_flooded_standard_band() -> None:
    # The benchmark's shape: 8 slots, bands 100/0/-10, holdback minCeiling 0.5 (ceilings
    # 1.0, 0.75, 0.5): standard stops at 6 in flight, critical uses the last two, and a
    # critical request waiting for a slot gets the next one before the standard backlog.
    cfg = ControllerConfig(bands={100: BandSpec(), 0: BandSpec(), -10: BandSpec()})
    holdback = PriorityHoldback(HoldbackParams(minCeiling=0.5))
    rig = Rig(cfg, capacity=8, usage_limit=holdback)
    await rig.fc.start()
    try:
        flood = [rig.submit("flood") for _ in range(20)]
        await wait_until(lambda: sum(t.done() for t in flood) == 6 and rig.fc.queued == 14)
        for _ in range(6):
            rig.place()
        for _ in range(2):
            assert await asyncio.wait_for(rig.submit("c", 100), 5) == Outcome.DISPATCHED
            rig.place()
        late = rig.submit("c", 100)
        await wait_until(lambda: rig.fc.queued == 15)
        rig.finish()  # one slot frees: 7 in flight, over standard's ceiling anyway
        assert await asyncio.wait_for(late, 5) == Outcome.DISPATCHED
        assert sum(t.done() for t in flood) == 6, "the standard backlog still waits"
        for t in flood:
            t.cancel()
    finally:
        await rig.fc.stop()
