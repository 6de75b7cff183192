"""The admission step of each request, between parsing and scheduling.

In order: the InferenceModelRewrite (the request's ``model`` becomes the chosen target),
the InferenceObjective's priority (``x-llm-d-inference-objective``, legacy
``x-gateway-inference-objective``; unknown names get priority 0 and are counted), the
admitter plugins, then either the legacy admission (gate off: a sheddable request,
priority < 0, is refused while the pool is saturated) or flow control (gate on: the
request waits in the EPP until dispatched, refused, or expired). The returned
``Admission`` charges the request to the in-flight ledger once scheduled, and frees it
when the request ends.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry

from epp.datastore import Endpoint
from epp.decision import Decision
from epp.flowcontrol.config import FlowControlSetup
from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.errors import SaturatedDropped, error_for
from epp.flowcontrol.eviction import RequestEvictor
from epp.flowcontrol.item import FlowItem, FlowKey
from epp.flowcontrol.ledger import InflightLedger
from epp.flowcontrol.metrics import FlowControlMetrics, RewriteMetrics
from epp.flowcontrol.saturation import ConcurrencyDetector, stage_saturation
from epp.requestmgmt.objects import ObjectStore

__all__ = [
    "FAIRNESS_HEADERS",
    "OBJECTIVE_HEADERS",
    "SLO_TTFT_HEADERS",
    "Admission",
    "RequestManager",
    "rewrite_body",
]

log = logging.getLogger(__name__)

OBJECTIVE_HEADERS = ("x-llm-d-inference-objective", "x-gateway-inference-objective")
FAIRNESS_HEADERS = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
SLO_TTFT_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
DEFAULT_FAIRNESS_ID = "default-flow"


class Source(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def rewrite_body(body: bytes, model: str) -> bytes:
    """The JSON body with its ``model`` replaced (other fields untouched in value)."""
    doc = json.loads(body)
    doc["model"] = model
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _fairness_id(headers: Mapping[str, str]) -> str:
    return next((headers[h] for h in FAIRNESS_HEADERS if headers.get(h)), DEFAULT_FAIRNESS_ID)


def _slo_seconds(headers: Mapping[str, str]) -> float | None:
    for name in SLO_TTFT_HEADERS:
        raw = headers.get(name)
        if raw is None or not raw.strip():
            continue
        try:
            ms = int(raw.strip())
        except ValueError:
            return None
        return ms / 1000.0 if ms > 0 else None
    return None


_TRACKING = itertools.count(1)


@dataclass
class Admission:
    """One admitted request's hold on the in-flight ledger."""

    ledger: InflightLedger
    tokens: int
    # Called once when the request ends (or is abandoned), and when a stage frees.
    on_end: Callable[[], None]
    on_stage_end: Callable[[], None] = lambda: None
    priority: int = 0
    on_usage: Callable[[int, int], None] = lambda _p, _c: None
    reserved: bool = False
    # In-flight eviction: the request is tracked once placed, untracked when it ends.
    evictor: RequestEvictor | None = None
    request_id: str = ""
    _placed: bool = False

    def abandon(self) -> None:
        """Scheduling failed after admission: give the reservation back."""
        if self.reserved and not self._placed:
            self.reserved = False
            self.ledger.unreserve(self.tokens)
            self.on_end()

    def place(self, decision: Decision) -> None:
        """Move the reservation onto the endpoints the scheduler picked."""
        if self._placed:
            return
        self._placed = True
        if self.reserved:
            self.ledger.unreserve(self.tokens)
        ledger, tokens = self.ledger, self.tokens
        decode, prefill = decision.decode, decision.prefill
        ledger.add(decode, tokens)
        if prefill:
            ledger.add(prefill, tokens)
        inner_prefill, inner_all = decision.release_prefill, decision.release_all
        # Tracked under a key of our own: the request id is the client's header, and two
        # requests carrying the same one must not share (or end) each other's entry.
        evictor, request_id = self.evictor, f"{self.request_id or 'untagged'}#{next(_TRACKING)}"
        if evictor is not None:
            decision.eviction = evictor.track(request_id, self.priority, decode)
        state = {"prefill": prefill is not None}

        def release_prefill() -> None:
            if state["prefill"]:
                state["prefill"] = False
                ledger.remove(prefill or "", tokens)
                self.on_stage_end()
            inner_prefill()

        def release_all() -> None:
            if evictor is not None:
                evictor.untrack(request_id)
            ledger.remove(decode, tokens)
            self.on_end()
            inner_all()

        decision.release_prefill = release_prefill
        decision.release_all = release_all
        decision.priority = self.priority
        decision.on_usage = self.on_usage


@dataclass
class RequestManager:
    setup: FlowControlSetup
    store: ObjectStore
    endpoints: Callable[[], Sequence[Endpoint]]
    registry: CollectorRegistry | None = None
    pool: str = ""
    sources: list[Source] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic
    ledger: InflightLedger = field(default_factory=InflightLedger)

    def __post_init__(self) -> None:
        if isinstance(self.setup.detector, ConcurrencyDetector):
            # Its scheduling-filter role reads the same in-flight accounting it gates on.
            self.setup.detector.ledger = self.ledger
        self.rewrite_metrics = RewriteMetrics(self.registry)
        self.fc_metrics: FlowControlMetrics | None = None
        self.controller: FlowController | None = None
        self.evictor: RequestEvictor | None = None
        if self.setup.enabled:
            self.fc_metrics = FlowControlMetrics(self.registry)
            if self.setup.eviction is not None:
                self.evictor = self.setup.eviction.build(self._count_revocations)
            self.controller = FlowController(
                self.setup.controller,
                self.setup.detector,
                self.endpoints,
                usage_limit=self.setup.usage_limit,
                ledger=self.ledger,
                metrics=self.fc_metrics,
                pool=self.pool,
                clock=self.clock,
                evictor=self.evictor,
            )

    def _count_revocations(self, n: int, outcome: str) -> None:
        m = self.fc_metrics
        if m is None:
            return
        kind, _, priority = outcome.partition(":")
        if kind == "issued":
            m.revocations_issued.labels(priority, self.pool).inc(n)
        else:
            m.revocations.labels(outcome, self.pool).inc(n)

    async def start(self) -> None:
        for source in self.sources:
            await source.start()
        if self.controller is not None:
            await self.controller.start()

    async def stop(self) -> None:
        if self.controller is not None:
            await self.controller.stop()
        for source in self.sources:
            await source.stop()

    @property
    def queue_wait_bound_s(self) -> float:
        """The longest a request can wait queued (0 without flow control, inf when a TTL
        is disabled), plus a margin for the expiry sweep."""
        if self.controller is None:
            return 0.0
        cfg = self.setup.controller
        if cfg.default_ttl_s <= 0 or cfg.no_endpoint_ttl_s <= 0:
            return math.inf
        return max(cfg.default_ttl_s, cfg.no_endpoint_ttl_s) + 1.0

    async def drain(self) -> None:
        """End every queued request (shutting down) and refuse new ones."""
        if self.controller is not None:
            await self.controller.stop()

    def endpoints_changed(self) -> None:
        if self.controller is not None:
            self.controller.notify()

    # -- per request ----------------------------------------------------------------

    def rewrite(self, model: str) -> str | None:
        """The model this request is sent on as, when a rewrite applies."""
        found = self.store.rewrite(model)
        if found is None:
            return None
        target, name = found
        self.rewrite_metrics.decisions.labels(name, model, target).inc()
        return target

    def priority(self, headers: Mapping[str, str]) -> int:
        for name in OBJECTIVE_HEADERS:
            value = headers.get(name)
            if value:
                objective = self.store.objective(value)
                if objective is None:
                    self.rewrite_metrics.unknown_objectives.inc()
                    log.debug("unknown InferenceObjective %r: default priority", value)
                    return 0
                return objective.priority
        return 0

    async def admit(
        self,
        headers: Mapping[str, str],
        *,
        model: str,
        target_model: str,
        byte_size: int,
        tokens: int,
        request_id: str,
        received: float,
    ) -> Admission:
        """Raise a ``Dropped`` refusal, or return the admitted request's ``Admission``."""
        priority = self.priority(headers)
        now = self.clock()
        endpoints = self.endpoints()
        for admitter in self.setup.admitters:
            if admitter.after_producers:
                continue
            reason = admitter.admit(priority, endpoints, now)
            if reason is not None:
                raise SaturatedDropped(f"{admitter.name}: sheddable request dropped")
        admission = Admission(self.ledger, tokens, self._ended, self._ended, priority)
        if self.controller is None:
            if priority < 0 and endpoints:
                sat = stage_saturation(self.setup.detector, endpoints, now, self.ledger)
                if sat.effective >= 1.0:
                    raise SaturatedDropped("system saturated, sheddable request dropped")
            return admission
        item = FlowItem(
            FlowKey(_fairness_id(headers), priority),
            request_id=request_id,
            byte_size=byte_size,
            tokens=tokens,
            model=model,
            target_model=target_model,
            received=received,
            slo_ttft_s=_slo_seconds(headers),
        )
        controller = self.controller
        outcome = await controller.enqueue_and_wait(item)
        err = error_for(outcome, pool_empty=not self.endpoints())
        if err is not None:
            raise err
        admission.reserved = True  # the controller reserved it in the ledger
        admission.evictor = self.evictor
        admission.request_id = request_id
        admission.on_end = lambda: controller.finished(item)
        admission.on_usage = lambda _prompt, completion: controller.usage(item, completion)
        return admission

    def _ended(self) -> None:
        if self.controller is not None:
            self.controller.notify()
