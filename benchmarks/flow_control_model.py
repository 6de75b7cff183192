"""The flow control benchmark's workload against the real flow controller, in virtual time.

    .venv/bin/python -m benchmarks.flow_control_model [--slots 16] [--min-ceiling 0.625]
        [--fairness program-aware|round-robin] [--service-ms 550] [--seconds 400]

No processes and no host noise: Poisson arrivals of the benchmark's class mix at 2x the
pool's capacity, ``--slots`` batch slots that each serve a request in ``--service-ms``,
and the ``FlowController`` (concurrency detector at the slot count, priority holdback,
the standard band's fairness policy, a 10 s TTL, a 50-request sheddable band) deciding
who takes each freed slot. Prints each class's queue wait at p50/p99, enough samples for
a real p99 (a 60 s live run sends about 280 critical and 130 quiet-tenant requests).
Waits scale with the service time: they are what flow control adds to a request's
unloaded time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import random
from dataclasses import dataclass

from benchmarks._loadgen import percentile
from epp.datastore import Endpoint
from epp.flowcontrol.controller import BandSpec, ControllerConfig, FlowController
from epp.flowcontrol.fairness import FairnessPolicy, ProgramAwareFairness, RoundRobinFairness
from epp.flowcontrol.item import FlowItem, FlowKey, Outcome
from epp.flowcontrol.saturation import ConcurrencyDetector, ConcurrencyParams
from epp.flowcontrol.usage_limits import HoldbackParams, PriorityHoldback

SERVICE_S = 0.55  # the live benchmark's service time with its default shape
LOAD = 2.0  # offered load / capacity
# (class, fairness id, priority, share), as in benchmarks.flow_control_bench
CLASSES = [
    ("critical", "c", 100, 0.10),
    ("standard/flood", "tenant-a", 0, 0.50),
    ("standard/quiet", "tenant-b", 0, 0.05),
    ("sheddable", "s", -10, 0.35),
]


@dataclass
class Waiting:
    item: FlowItem
    cls: str
    arrived: float
    task: asyncio.Future[str]


async def model(
    slots: int,
    min_ceiling: float,
    fairness: str,
    seconds: float,
    seed: int,
    service_s: float = SERVICE_S,
) -> dict[str, list[float]]:
    now = [0.0]
    pool = [Endpoint("e", "10.0.0.1", 8000)]
    band_fairness: FairnessPolicy = (
        ProgramAwareFairness(clock=lambda: now[0])
        if fairness == "program-aware"
        else RoundRobinFairness()
    )
    cfg = ControllerConfig(
        default_ttl_s=10.0,
        bands={
            100: BandSpec(),
            0: BandSpec(fairness=band_fairness),
            -10: BandSpec(max_requests=50),
        },
    )
    ctl = FlowController(
        cfg,
        ConcurrencyDetector(ConcurrencyParams(maxConcurrency=slots)),
        lambda: pool,
        usage_limit=PriorityHoldback(HoldbackParams(minCeiling=min_ceiling))
        if min_ceiling
        else None,
        clock=lambda: now[0],
    )
    ctl._running = True  # cycles driven here, not by the dispatch task
    key = pool[0].key
    rng = random.Random(seed)
    events: list[tuple[float, int, int]] = []  # (time, 0 arrival / 1 completion, class index)
    t = 0.0
    while True:
        t += rng.expovariate(LOAD * slots / service_s)
        if t >= seconds:
            break
        draw, acc, index = rng.random(), 0.0, len(CLASSES) - 1
        for i, (_, _, _, share) in enumerate(CLASSES):
            acc += share
            if draw < acc:
                index = i
                break
        heapq.heappush(events, (t, 0, index))
    waits: dict[str, list[float]] = {c[0]: [] for c in CLASSES}
    waiting: list[Waiting] = []
    while events:
        t, kind, index = heapq.heappop(events)
        now[0] = t
        if kind == 0:
            cls, fid, prio, _ = CLASSES[index]
            item = FlowItem(FlowKey(fid, prio), tokens=60)
            task = asyncio.ensure_future(ctl.enqueue_and_wait(item))
            await asyncio.sleep(0)  # runs the enqueue up to its wait (or its dispatch)
            waiting.append(Waiting(item, cls, t, task))
        else:
            ctl.ledger.remove(key, 0)
        ctl.sweep(t)
        while ctl.dispatch_once(t):
            pass
        still = []
        for w in waiting:
            if w.item.outcome is None:
                still.append(w)
            elif w.item.outcome == Outcome.DISPATCHED:
                ctl.ledger.unreserve(w.item.tokens)
                ctl.ledger.add(key, 0)
                waits[w.cls].append(t - w.arrived)
                heapq.heappush(events, (t + service_s, 1, 0))
        waiting = still
    await ctl.stop()
    await asyncio.gather(*(w.task for w in waiting), return_exceptions=True)
    return waits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--min-ceiling", type=float, default=0.625)
    parser.add_argument(
        "--fairness", choices=("round-robin", "program-aware"), default="program-aware"
    )
    parser.add_argument("--seconds", type=float, default=400.0)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--service-ms", type=float, default=SERVICE_S * 1000)
    args = parser.parse_args()
    waits = asyncio.run(
        model(
            args.slots,
            args.min_ceiling,
            args.fairness,
            args.seconds,
            args.seed,
            args.service_ms / 1000,
        )
    )
    print("| class | dispatched | queue wait p50 ms | queue wait p99 ms |")
    print("|---|---|---|---|")
    for cls, w in waits.items():
        w.sort()
        if w:
            p50, p99 = percentile(w, 50) * 1000, percentile(w, 99) * 1000
            print(f"| {cls} | {len(w)} | {p50:.0f} | {p99:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
