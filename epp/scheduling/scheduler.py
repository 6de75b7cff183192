"""One scheduling cycle: producers, the profile handler loop, then trackers."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from epp.datastore import Endpoint
from epp.decision import InternalError
from epp.plugins.base import (
    DataProducer,
    ProfileHandler,
    Release,
    RequestTracker,
    ResponseBodyProcessor,
    ResponseHeaderProcessor,
)
from epp.scheduling.cycle import CycleState, StateKey
from epp.scheduling.profile import Profile
from epp.scheduling.result import ProfileResult, SchedulingResult
from epp.tracing import run_profile

__all__ = ["Scheduler", "Tracking"]

log = logging.getLogger(__name__)

# Set once ``produce`` ran the producers' ``prepare`` for the cycle.
_PREPARED: StateKey[bool] = StateKey("producers-prepared")

# A handler that keeps asking for profiles is a bug; stop it rather than spin.
_MAX_ROUNDS = 16


@dataclass(slots=True)
class Tracking:
    """What every tracker recorded for one request: its release hooks, one per tracker.

    ``release_stages`` runs when the prefill and encode stages are over, ``release_all``
    when the request ends; ``reassign`` moves the decode's share to the endpoint that
    really served the request. The ``Decision`` makes each of them run at most once.
    """

    cycle: CycleState
    result: SchedulingResult
    trackers: tuple[RequestTracker, ...] = ()
    stage_hooks: list[Release] = field(default_factory=list)
    decode_hooks: list[Release] = field(default_factory=list)

    def release_stages(self) -> None:
        for hook in self.stage_hooks:
            hook()

    def release_all(self) -> None:
        for hook in self.decode_hooks:
            hook()

    def first_token(self) -> None:
        for tracker in self.trackers:
            tracker.first_token(self.cycle)

    def reassign(self, served: Endpoint) -> None:
        served_result = self.result.served_by(served)
        for i, tracker in enumerate(self.trackers):
            self.decode_hooks[i] = tracker.reassign(self.cycle, served_result, self.decode_hooks[i])


@dataclass(frozen=True, slots=True)
class Scheduler:
    handler: ProfileHandler
    profiles: Mapping[str, Profile]
    producers: tuple[DataProducer, ...] = ()
    trackers: tuple[RequestTracker, ...] = ()
    responders: tuple[ResponseHeaderProcessor, ...] = ()
    body_processors: tuple[ResponseBodyProcessor, ...] = ()

    async def prefetch(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        """Let producers do their I/O before the (synchronous) scheduling cycle."""
        for producer in self.producers:
            await producer.prefetch(cycle, endpoints)

    async def produce(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        """Every producer's work for the request, before admission and scheduling: their
        I/O, their per-request data, then what needs the others' data (``settle``)."""
        await self.prefetch(cycle, endpoints)
        self._prepare(cycle, endpoints)
        cycle.put(_PREPARED, True)
        for producer in self.producers:
            await producer.settle(cycle, endpoints)

    def _prepare(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        for producer in self.producers:
            t0 = perf_counter()
            producer.prepare(cycle, endpoints)
            producer.observe(perf_counter() - t0)

    def schedule(
        self,
        cycle: CycleState,
        endpoints: Sequence[Endpoint],
        destinations: Sequence[Endpoint] | None = None,
    ) -> SchedulingResult:
        """Run the profiles over ``endpoints``. ``destinations``, when given, are the only
        endpoints the request may be sent to (the gateway's subset hint): they scope the
        profile whose pick is the destination, while the prefill and encode stages still
        choose among all endpoints."""
        if not cycle.get(_PREPARED):
            self._prepare(cycle, endpoints)
        scoped: str | None = None
        if destinations is not None:
            scoped = self.handler.destination_profile(cycle, self.profiles)
        results: dict[str, ProfileResult | None] = {}
        for _ in range(_MAX_ROUNDS):
            t0 = perf_counter()
            names = self.handler.pick_profiles(cycle, self.profiles, results)
            self.handler.observe(perf_counter() - t0)
            if not names:
                break
            for name in names:
                pool = endpoints
                if destinations is not None and (scoped is None or name == scoped):
                    pool = destinations
                results[name] = run_profile(self.profiles[name], cycle, pool)
        else:
            raise InternalError(f"profile handler '{self.handler.name}' did not finish")
        result = self.handler.process_results(cycle, results)
        if destinations is not None:
            allowed = {ep.key for ep in destinations}
            outside = [ep.key for ep in result.targets(result.primary) if ep.key not in allowed]
            if outside:
                # The handler named another destination profile than it made primary.
                raise InternalError(
                    f"profile handler '{self.handler.name}' picked {', '.join(outside)} "
                    "outside the gateway's subset hint"
                )
        return result

    def track(self, cycle: CycleState, result: SchedulingResult) -> Tracking:
        """Let every tracker record the result; keep their release hooks."""
        tracking = Tracking(cycle, result, self.trackers)
        for tracker in self.trackers:
            release_stages, release_decode = tracker.track(cycle, result)
            tracking.stage_hooks.append(release_stages)
            tracking.decode_hooks.append(release_decode)
        return tracking

    def response_headers(
        self, cycle: CycleState, lb_metadata: Mapping[str, Any] | None
    ) -> dict[str, str]:
        """What every response-header processor adds, in configuration order; a plugin
        that fails adds nothing (the response still goes through)."""
        out: dict[str, str] = {}
        for responder in self.responders:
            try:
                out.update(responder.response_headers(cycle, lb_metadata))
            except Exception:
                log.exception(
                    "request %s: response-header plugin %s failed",
                    cycle.request.request_id or "-", responder.name,
                )  # fmt: skip
        return out

    def response_body(self, cycle: CycleState, end_of_stream: bool) -> None:
        """Hand one response body message to every body processor; one that fails is
        logged and the response goes on."""
        for processor in self.body_processors:
            try:
                processor.response_body(cycle, end_of_stream)
            except Exception:
                log.exception(
                    "request %s: response-body plugin %s failed",
                    cycle.request.request_id or "-", processor.name,
                )  # fmt: skip
