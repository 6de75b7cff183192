"""One scheduling cycle: producers, the profile handler loop, then trackers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter

from epp.datastore import Endpoint
from epp.decision import InternalError
from epp.plugins.base import DataProducer, ProfileHandler, Release, RequestTracker
from epp.scheduling.cycle import CycleState
from epp.scheduling.profile import Profile
from epp.scheduling.result import ProfileResult, SchedulingResult
from epp.tracing import run_profile

__all__ = ["Scheduler"]

# A handler that keeps asking for profiles is a bug; stop it rather than spin.
_MAX_ROUNDS = 16


@dataclass(frozen=True, slots=True)
class Scheduler:
    handler: ProfileHandler
    profiles: Mapping[str, Profile]
    producers: tuple[DataProducer, ...] = ()
    trackers: tuple[RequestTracker, ...] = ()

    async def prefetch(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        """Let producers do their I/O before the (synchronous) scheduling cycle."""
        for producer in self.producers:
            await producer.prefetch(cycle, endpoints)

    def schedule(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> SchedulingResult:
        for producer in self.producers:
            t0 = perf_counter()
            producer.prepare(cycle, endpoints)
            producer.observe(perf_counter() - t0)
        results: dict[str, ProfileResult | None] = {}
        for _ in range(_MAX_ROUNDS):
            t0 = perf_counter()
            names = self.handler.pick_profiles(cycle, self.profiles, results)
            self.handler.observe(perf_counter() - t0)
            if not names:
                break
            for name in names:
                results[name] = run_profile(self.profiles[name], cycle, endpoints)
        else:
            raise InternalError(f"profile handler '{self.handler.name}' did not finish")
        return self.handler.process_results(cycle, results)

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        """Let every tracker record the result; combine their release hooks."""
        if not self.trackers:
            return _noop, _noop
        hooks = [t.track(cycle, result) for t in self.trackers]
        prefill_hooks = [h[0] for h in hooks]
        all_hooks = [h[1] for h in hooks]

        def release_prefill() -> None:
            for h in prefill_hooks:
                h()

        def release_all() -> None:
            for h in all_hooks:
                h()

        return release_prefill, release_all


def _noop() -> None:
    return None
