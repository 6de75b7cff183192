"""Per-endpoint loops started together spread their polls over the period."""

from __future__ import annotations

import asyncio
import time

from epp.datalayer.endpoint_loops import EndpointLoops, phase_of
from epp.datastore import Datastore, Endpoint


def test_phases_spread_over_the_period() -> None:
    phases = [phase_of(f"10.0.{i // 250}.{i % 250}:8000") for i in range(1000)]
    assert all(0 < p <= 1 for p in phases)
    # Evenly spread: every tenth of the period holds a fair share of 1,000 endpoints.
    for tenth in range(10):
        share = sum(tenth / 10 < p <= (tenth + 1) / 10 for p in phases)
        assert 50 < share < 150


async def test_loops_started_together_poll_at_their_own_phase() -> None:
    period = 1.0
    endpoints = [Endpoint(f"e{i}", "127.0.0.1", 9000 + i) for i in range(40)]
    early = [ep for ep in endpoints if phase_of(ep.key) < 0.3]
    late = [ep for ep in endpoints if phase_of(ep.key) > 0.8]
    assert early and late
    polls: dict[str, list[float]] = {ep.key: [] for ep in endpoints}
    done = asyncio.Event()

    async def once(ep: Endpoint) -> None:
        polls[ep.key].append(time.monotonic())
        if all(len(polls[e.key]) >= 2 for e in late):
            done.set()

    store = Datastore()
    store.replace_source("test", endpoints)
    loops = EndpointLoops("test", once, lambda: period)
    loops.start(store)
    try:
        await asyncio.wait_for(done.wait(), 10 * period)
    finally:
        await loops.stop()
    # Everyone polled at once first; the second polls came at each loop's phase.
    assert all(polls[ep.key] for ep in endpoints)
    for ep in early:
        assert polls[ep.key][1] - polls[ep.key][0] < 0.3 * period + 0.5
    second_early = max(polls[ep.key][1] for ep in early)
    second_late = min(polls[ep.key][1] for ep in late)
    first = min(p[0] for p in polls.values())
    assert second_late - first >= 0.8 * period - 0.05
    assert second_early < second_late
