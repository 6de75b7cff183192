"""The flow controller: requests wait here, not in the engines' queues.

``enqueue_and_wait`` admits a request into its priority band's flow queue (or refuses it
at the capacity boundary) and returns its outcome once dispatched, expired or shed. A
single dispatch task runs cycles: read the pool saturation, ask the usage-limit policy
for each band's ceiling, and dispatch one request from the highest non-gated band (its
fairness policy picks the flow, the flow's ordering policy the request). Cycles run when
a request arrives or finishes, and on a short tick while anything is queued, so the
event loop is never blocked. A waiter that is cancelled (the client left) leaves the
queue at once. With eviction on, a band that waits on saturation asks the evictor to
evict lower-priority requests in flight (``epp.flowcontrol.eviction``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter

from epp.datastore import Endpoint
from epp.flowcontrol.eviction import RequestEvictor
from epp.flowcontrol.fairness import FairnessPolicy, GlobalStrictFairness
from epp.flowcontrol.item import FlowItem, Outcome
from epp.flowcontrol.ledger import InflightLedger
from epp.flowcontrol.metrics import FlowControlMetrics
from epp.flowcontrol.ordering import FcfsOrdering, OrderingPolicy
from epp.flowcontrol.queues import Band
from epp.flowcontrol.saturation import SaturationDetector, StageSaturation, stage_saturation
from epp.flowcontrol.usage_limits import StaticUsageLimit, UsageLimitPolicy

__all__ = ["BandSpec", "ControllerConfig", "FlowController"]

log = logging.getLogger(__name__)

DEFAULT_BAND_MAX_REQUESTS = 5000
DEFAULT_BAND_MAX_BYTES = 10**9
DEFAULT_TTL_S = 60.0


@dataclass(frozen=True)
class BandSpec:
    max_requests: int = DEFAULT_BAND_MAX_REQUESTS
    max_bytes: int = DEFAULT_BAND_MAX_BYTES
    fairness: FairnessPolicy = field(default_factory=GlobalStrictFairness)
    ordering: OrderingPolicy = field(default_factory=FcfsOrdering)


@dataclass(frozen=True)
class ControllerConfig:
    default_ttl_s: float = DEFAULT_TTL_S
    no_endpoint_ttl_s: float = DEFAULT_TTL_S
    max_requests: int = 0  # global; 0 = none
    max_bytes: int = 0
    bands: dict[int, BandSpec] = field(default_factory=dict)
    default_band: BandSpec = field(default_factory=BandSpec)
    default_negative_band: BandSpec | None = None
    # Re-evaluation period while requests are queued and nothing else wakes the loop.
    tick_s: float = 0.02
    sweep_s: float = 0.02

    def band_spec(self, priority: int) -> BandSpec:
        spec = self.bands.get(priority)
        if spec is not None:
            return spec
        if priority < 0 and self.default_negative_band is not None:
            return self.default_negative_band
        return self.default_band


class FlowController:
    def __init__(
        self,
        config: ControllerConfig,
        detector: SaturationDetector,
        endpoints: Callable[[], Sequence[Endpoint]],
        *,
        usage_limit: UsageLimitPolicy | None = None,
        ledger: InflightLedger | None = None,
        metrics: FlowControlMetrics | None = None,
        pool: str = "",
        clock: Callable[[], float] = time.monotonic,
        evictor: RequestEvictor | None = None,
    ) -> None:
        self.config = config
        self.detector = detector
        self.usage_limit = usage_limit or StaticUsageLimit()
        self.ledger = ledger if ledger is not None else InflightLedger()
        self.metrics = metrics
        self.pool = pool
        self._endpoints = endpoints
        self._clock = clock
        # In-flight eviction (flowControl.enableEviction); None when off.
        self.evictor = evictor
        self._bands: dict[int, Band] = {}
        self._priorities: list[int] = []
        self._items: dict[int, FlowItem] = {}
        self._queued = 0
        self._bytes = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self.last_saturation = StageSaturation(None, 1.0)
        for priority in config.bands:
            self._band(priority)

    # -- state ----------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queued

    def queued_in(self, priority: int) -> int:
        band = self._bands.get(priority)
        return band.requests if band is not None else 0

    def _band(self, priority: int) -> Band:
        band = self._bands.get(priority)
        if band is None:
            spec = self.config.band_spec(priority)
            band = self._bands[priority] = Band(
                priority, spec.max_requests, spec.max_bytes, spec.fairness, spec.ordering
            )
            self._priorities = sorted(self._bands, reverse=True)
        return band

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._running = True
            self._task = asyncio.create_task(self._run(), name="flow control dispatch")

    async def stop(self) -> None:
        """Stop dispatching; every queued request ends now (shutting down)."""
        self._running = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        now = self._clock()
        for item in list(self._items.values()):
            self._remove(item)
            self._finish(item, Outcome.EVICTED_OTHER, now)

    def notify(self) -> None:
        """Capacity may have changed (a request finished, endpoints changed)."""
        self._wake.set()

    def finished(self, item: FlowItem, output_tokens: int = 0) -> None:
        """A dispatched request ended: its flow's fairness state learns it, and a
        dispatch cycle runs (its capacity may be free)."""
        band = self._bands.get(item.key.priority)
        if band is not None:
            band.fairness.on_finished(item, output_tokens, self._clock())
        self._wake.set()

    def usage(self, item: FlowItem, output_tokens: int) -> None:
        band = self._bands.get(item.key.priority)
        if band is not None:
            band.fairness.on_usage(item, output_tokens, self._clock())

    # -- admission ------------------------------------------------------------------

    def _saturation(self, now: float) -> StageSaturation:
        sat = stage_saturation(self.detector, self._endpoints(), now, self.ledger)
        self.last_saturation = sat
        return sat

    def _ceiling(self, saturation: float, priority: int) -> float:
        ceilings = self.usage_limit.ceilings(saturation, self._priorities)
        return ceilings[self._priorities.index(priority)]

    async def enqueue_and_wait(self, item: FlowItem) -> str:
        """The request's outcome (an ``Outcome`` value). Cancelling the caller takes the
        request out of the queue at once."""
        t0 = perf_counter()
        now = self._clock()
        item.enqueued = now
        if not item.received:
            item.received = now
        band = self._band(item.key.priority)
        if not self._running:
            return self._reject(item, Outcome.REJECTED_OTHER, now, t0)
        pool_empty = not self._endpoints()
        cfg = self.config
        over = (
            band.requests + 1 > band.max_requests
            or band.bytes + item.byte_size > band.max_bytes
            or (cfg.max_requests > 0 and self._queued + 1 > cfg.max_requests)
            or (cfg.max_bytes > 0 and self._bytes + item.byte_size > cfg.max_bytes)
        )
        if over:
            outcome = Outcome.REJECTED_NO_ENDPOINTS if pool_empty else Outcome.REJECTED_CAPACITY
            return self._reject(item, outcome, now, t0)
        item.budget_start = now
        item.budget_empty_pool = pool_empty
        item.ttl_s = cfg.no_endpoint_ttl_s if pool_empty else cfg.default_ttl_s
        # Fast path: nothing waits and this band is not gated.
        if self._queued == 0 and not pool_empty:
            sat = self._saturation(now)
            if sat.effective < self._ceiling(sat.effective, item.key.priority):
                self._observe_enqueue(item, "Dispatched", t0)
                self._dispatched(item, band, now)
                return Outcome.DISPATCHED
        loop = asyncio.get_running_loop()
        item.future = loop.create_future()
        band.flow(item.key.fairness_id).push(item)
        band.requests += 1
        band.bytes += item.byte_size
        self._queued += 1
        self._bytes += item.byte_size
        self._items[item.seq] = item
        self._gauge(item, +1)
        self._observe_enqueue(item, "Queued", t0)
        self._wake.set()
        try:
            return await asyncio.shield(item.future)
        except asyncio.CancelledError:
            if not item.done:
                self._remove(item)
                self._finish(item, Outcome.EVICTED_CONTEXT_CANCELLED, self._clock())
            elif item.outcome == Outcome.DISPATCHED:
                # Dispatched in the same instant the client left: give the slot back.
                self.ledger.unreserve(item.tokens)
                self._wake.set()
            raise

    def _reject(self, item: FlowItem, outcome: str, now: float, t0: float) -> str:
        self._observe_enqueue(item, outcome, t0)
        self._finish(item, outcome, now)
        return outcome

    def _observe_enqueue(self, item: FlowItem, outcome: str, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.enqueue_duration.labels(
                item.key.fairness_id, str(item.key.priority), outcome
            ).observe(perf_counter() - t0)

    def _gauge(self, item: FlowItem, sign: int) -> None:
        m = self.metrics
        if m is None:
            return
        labels = (
            item.key.fairness_id,
            str(item.key.priority),
            self.pool,
            item.model,
            item.target_model,
        )
        m.queue_size.labels(*labels).inc(sign)
        m.queue_bytes.labels(*labels).inc(sign * item.byte_size)

    def _remove(self, item: FlowItem) -> None:
        """Take a queued item out of its band's accounting (its heap entry goes lazily)."""
        if self._items.pop(item.seq, None) is None:
            return
        band = self._bands[item.key.priority]
        flow = band.flows.get(item.key.fairness_id)
        if flow is not None:
            flow.forget()
            band.prune(item.key.fairness_id)
        self._unaccount(band, item)

    def _unaccount(self, band: Band, item: FlowItem) -> None:
        band.requests -= 1
        band.bytes -= item.byte_size
        self._queued -= 1
        self._bytes -= item.byte_size
        self._gauge(item, -1)

    def _finish(self, item: FlowItem, outcome: str, now: float) -> None:
        item.outcome = outcome
        if item.future is not None and not item.future.done():
            item.future.set_result(outcome)
        m = self.metrics
        if m is not None:
            prio = str(item.key.priority)
            m.requests.labels(outcome, prio, self.pool).inc()
            m.queue_duration.labels(
                item.key.fairness_id, prio, outcome, self.pool, item.model, item.target_model
            ).observe(max(0.0, now - item.enqueued))

    def _dispatched(self, item: FlowItem, band: Band, now: float) -> None:
        # Counted against the pool until the scheduler places it (InflightLedger).
        self.ledger.reserve(item.tokens)
        band.fairness.on_dispatch(item, now)
        self._finish(item, Outcome.DISPATCHED, now)

    # -- dispatch -------------------------------------------------------------------

    def dispatch_once(self, now: float | None = None) -> bool:
        """One dispatch cycle; True when a request was dispatched."""
        if self._queued == 0:
            return False
        now = self._clock() if now is None else now
        if not self._endpoints():
            return False
        sat = self._saturation(now).effective
        ceilings = self.usage_limit.ceilings(sat, self._priorities)
        for priority, ceiling in zip(self._priorities, ceilings, strict=True):
            band = self._bands[priority]
            if band.requests == 0:
                continue
            if sat >= ceiling:
                if self.evictor is not None:
                    self.evictor.reclaim(sat, ceiling, priority)
                return False  # this band and every lower one wait
            flow = band.fairness.select(band, now)
            item = flow.pop() if flow is not None else None
            if flow is None or item is None:
                continue
            self._items.pop(item.seq, None)
            band.prune(item.key.fairness_id)
            self._unaccount(band, item)
            self._dispatched(item, band, now)
            return True
        return False

    def sweep(self, now: float | None = None) -> int:
        """Expire queued requests whose wait budget ran out; returns how many."""
        now = self._clock() if now is None else now
        if not self._items:
            return 0
        cfg = self.config
        empty = not self._endpoints()
        bound = max(cfg.default_ttl_s, cfg.no_endpoint_ttl_s)
        expired = 0
        for item in list(self._items.values()):
            if item.budget_empty_pool != empty:
                item.budget_empty_pool = empty
                item.budget_start = now
            ttl = cfg.no_endpoint_ttl_s if empty else cfg.default_ttl_s
            over_budget = ttl > 0 and now - item.budget_start >= ttl
            over_bound = (
                cfg.default_ttl_s > 0
                and cfg.no_endpoint_ttl_s > 0
                and (now - item.enqueued >= bound)
            )
            if over_budget or over_bound:
                self._remove(item)
                outcome = Outcome.EVICTED_NO_ENDPOINTS if empty else Outcome.EVICTED_TTL
                self._finish(item, outcome, now)
                expired += 1
        return expired

    def _publish(self) -> None:
        m = self.metrics
        if m is None:
            return
        sat = self.last_saturation
        m.pool_saturation.labels(self.pool, "decode").set(sat.decode)
        if sat.prefill is not None:
            m.pool_saturation.labels(self.pool, "prefill").set(sat.prefill)
        m.pool_saturation.labels(self.pool, "effective").set(sat.effective)
        m.stale_endpoints.labels(self.detector.type_name).set(self.detector.stale_endpoints)
        for priority, band in self._bands.items():
            m.capacity_requests.labels(str(priority), self.pool).set(
                band.requests / band.max_requests
            )
            m.capacity_bytes.labels(str(priority), self.pool).set(band.bytes / band.max_bytes)
        if self.config.max_requests:
            m.global_requests.labels(self.pool).set(self._queued / self.config.max_requests)
        if self.config.max_bytes:
            m.global_bytes.labels(self.pool).set(self._bytes / self.config.max_bytes)

    async def _run(self) -> None:
        next_sweep = 0.0
        next_publish = 0.0
        while True:
            t0 = perf_counter()
            now = self._clock()
            try:
                progressed = self.dispatch_once(now)
                if now >= next_sweep:
                    self.sweep(now)
                    next_sweep = now + self.config.sweep_s
                if now >= next_publish:
                    if not self._queued:
                        self._saturation(now)
                    self._publish()
                    next_publish = now + 1.0
            except Exception:
                log.exception("flow control dispatch cycle failed")
                progressed = False
            if self.metrics is not None:
                self.metrics.dispatch_cycle.observe(perf_counter() - t0)
            if progressed:
                await asyncio.sleep(0)  # let the dispatched request run before the next
                continue
            self._wake.clear()
            timeout = self.config.tick_s if self._queued else 1.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
