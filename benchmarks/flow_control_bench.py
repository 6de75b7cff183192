"""Flow control under overload: the same open-loop load with flow control off and on.

    .venv/bin/python -m benchmarks.flow_control_bench [--duration 60] [--load 2.0]

The local stack (``--engines`` simulated decode engines of ``--batch`` slots, a sidecar
each, the EPP, real Envoy) serves streaming chat requests from three classes, chosen by
InferenceObjective (``--api-objects-file``): critical (priority 100), standard (0) and
sheddable (-10); the standard class is two tenants (``x-llm-d-inference-fairness-id``),
one sending ten times the other's rate. The offered load is ``--load`` times the pool's
capacity, measured first from unloaded requests (capacity = slots / service time). The
default shape: two engines of 8 slots, prompts of about 2,000 tokens and 12 output
tokens, so the time to first token (about 0.56 s) is most of a request's time in the
engine (about 0.74 s).

Off: the legacy admission path (sheddable requests refused while the concurrency
detector says saturated; everything else queues in the engines). On: ``featureGates:
[flowControl]``; requests wait in the EPP and dispatch by priority as the engines'
batch slots free, and within the standard band by ``program-aware-fairness`` (least
attained service first: the quiet tenant's requests go before the flood's backlog;
``--fairness round-robin-fairness-policy`` alternates the tenants instead). The
configuration a serving engineer would pick for this pool: the concurrency detector's
``maxConcurrency`` is the engines' batch (so the pool is saturated exactly when every
slot is busy and nothing queues inside an engine), the same detector filters the decode
profile (a dispatched request goes to the engine with the free slot, not by metrics
scraped before the last dispatches), and ``priority-holdback-policy`` with ``minCeiling``
0.625 (ceilings 1.0 / 0.8125 / 0.625) stops the standard band at 13 of the 16 slots and
the sheddable band at 10: critical work is a fifth of the pool's capacity, so the slots
kept for it mean a critical request rarely waits for one to free. The price is goodput:
those slots idle while no critical request needs them. ``benchmarks.flow_control_model``
runs the same workload against the same controller in virtual time, for p99s over
thousands of requests.

Reported per mode: TTFT p50/p99 per class and tenant, the EPP queue wait per class
(flow control on; bucket bounds of the EPP's own histogram, which separates the wait
flow control imposes from the rest of the path), goodput, refusals by dropped reason,
EPP CPU per request; and, in process, the cost of one flow-control decision
(enqueue, dispatch cycle) with 1,000 requests queued. ``--svg PATH`` draws TTFT over time
per class for both modes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

from benchmarks._loadgen import percentile
from examples.local_stack import LocalStack, StackOptions
from examples.local_stack.stack import default_epp_config


@dataclass(frozen=True)
class Shape:
    """The pool and the requests: ``engines`` simulated engines of ``batch`` slots each
    (150 ms base time to first token, 0.2 ms per prompt token, 15 ms per output token),
    serving prompts of about ``prompt_words`` tokens and ``max_tokens`` output tokens."""

    engines: int = 2
    batch: int = 8
    prompt_words: int = 2000
    max_tokens: int = 12

    @property
    def slots(self) -> int:
        return self.engines * self.batch

    def sim_args(self) -> list[str]:
        return [
            "--max-num-seqs",
            str(self.batch),
            "--ttft-base-ms",
            "150",
            "--itl-ms",
            "15",
            "--prefill-ms-per-token",
            "0.2",
        ]


# (class, objective, tenant, share of the offered load)
CLASSES = [
    ("critical", "critical", "c", 0.10),
    ("standard/flood", "standard", "tenant-a", 0.50),
    ("standard/quiet", "standard", "tenant-b", 0.05),
    ("sheddable", "sheddable", "s", 0.35),
]
OBJECTS = """\
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 100, poolRef: {name: local}}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: standard}
spec: {priority: 0, poolRef: {name: local}}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: sheddable}
spec: {priority: -10, poolRef: {name: local}}
"""


def epp_config(
    workdir: Path,
    flow_control: bool,
    min_ceiling: float = 0.0,
    fairness: str = "program-aware-fairness",
    batch: int = Shape.batch,
) -> Path:
    config = yaml.safe_load(default_epp_config(workdir / "endpoints.yaml", 16))
    config["plugins"].append(
        {"type": "concurrency-detector", "parameters": {"maxConcurrency": batch}}
    )
    if flow_control:
        config["featureGates"] = ["flowControl"]
        # The detector as a scheduling filter too: a dispatched request goes to an engine
        # with a free batch slot, never into one engine's queue while the other has room
        # (the scorers read scraped metrics, which lag the dispatches of the last scrape
        # interval). Not with flow control off: there every request goes straight to
        # scheduling, and the filter would leave none when all engines are full.
        config["schedulingProfiles"][0]["plugins"].insert(1, {"pluginRef": "concurrency-detector"})
        config["plugins"].append({"type": fairness})
        if min_ceiling:
            # Lower bands stop dispatching earlier, keeping batch slots for critical work.
            config["plugins"].append(
                {
                    "type": "priority-holdback-policy",
                    "name": "holdback",
                    "parameters": {"minCeiling": min_ceiling},
                }
            )
        config["flowControl"] = {
            "defaultRequestTTL": "10s",
            **({"usageLimitPolicyPluginRef": "holdback"} if min_ceiling else {}),
            "priorityBands": [
                {"priority": 100},
                {"priority": 0, "fairnessPolicyRef": fairness},
                {"priority": -10, "maxRequests": 50},
            ],
        }
    path = workdir / f"epp-config-{'on' if flow_control else 'off'}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Shot:
    cls: str
    sent: float  # seconds since the load started
    ttft: float | None = None
    status: int = 0
    reason: str = ""


@dataclass
class Run:
    mode: str
    shots: list[Shot] = field(default_factory=list)
    duration: float = 0.0
    epp_cpu_s: float = 0.0
    # Flow control on: per class, the EPP queue wait of dispatched requests at p50 and
    # p99, as the upper bounds of the EPP histogram's buckets (seconds).
    queue_wait: dict[str, tuple[float, float]] = field(default_factory=dict)
    client_lag_p99: float = 0.0  # the load generator's event-loop lag, seconds


# The EPP's flow-control queue wait, by the labels that tell the classes apart.
_CLASS_OF_FLOW = {tenant: name for name, _, tenant, _ in CLASSES}


async def epp_queue_waits(metrics_port: int) -> dict[str, tuple[float, float]]:
    """p50 and p99 bucket bounds of each class's queue wait (dispatched requests)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        text = await r.text()
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    name = "llm_d_epp_flow_control_request_queue_duration_seconds_bucket{"
    for line in text.splitlines():
        if not line.startswith(name) or 'outcome="Dispatched"' not in line:
            continue
        labels, _, value = line[len(name) :].rpartition("} ")
        fields = dict(part.split("=", 1) for part in labels.split(","))
        cls = _CLASS_OF_FLOW.get(fields.get("fairness_id", "").strip('"'))
        if cls is not None:
            buckets[cls].append((float(fields["le"].strip('"')), float(value)))
    out: dict[str, tuple[float, float]] = {}
    for cls, rows in buckets.items():
        rows.sort()
        total = rows[-1][1]
        if total:
            p50 = next(le for le, n in rows if n >= 0.5 * total)
            p99 = next(le for le, n in rows if n >= 0.99 * total)
            out[cls] = (p50, p99)
    return out


def pick_class(draw: float) -> tuple[str, str, str]:
    acc = 0.0
    for name, objective, tenant, share in CLASSES:
        acc += share
        if draw < acc:
            return name, objective, tenant
    return CLASSES[-1][0], CLASSES[-1][1], CLASSES[-1][2]


def _body(rng: random.Random, shape: Shape) -> dict[str, Any]:
    words = " ".join(rng.choices(("alpha", "beta", "gamma", "delta"), k=shape.prompt_words))
    return {
        "model": "sim-model",
        "messages": [{"role": "user", "content": f"{rng.random()} {words}"}],
        "max_tokens": shape.max_tokens,
        "stream": True,
    }


async def _one(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict[str, Any]
) -> tuple[int, float | None, str]:
    started = time.perf_counter()
    async with session.post(url, json=body, headers=headers) as r:
        if r.status != 200:
            await r.read()
            return r.status, None, r.headers.get("x-llm-d-request-dropped-reason", "")
        ttft = None
        async for chunk in r.content.iter_any():
            if ttft is None and b"data:" in chunk:
                ttft = time.perf_counter() - started
        return 200, ttft, ""


async def service_time(url: str, shape: Shape, n: int = 6) -> float:
    rng = random.Random(1)
    async with aiohttp.ClientSession() as session:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await _one(session, url, {}, _body(rng, shape))
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


async def unloaded_ttft(url: str, shape: Shape, n: int = 8) -> float:
    rng = random.Random(2)
    async with aiohttp.ClientSession() as session:
        ttfts = []
        for _ in range(n):
            _, ttft, _ = await _one(
                session, url, {"x-llm-d-inference-objective": "critical"}, _body(rng, shape)
            )
            if ttft is not None:
                ttfts.append(ttft)
    return statistics.median(ttfts)


async def loop_lag(out: list[float], period: float = 0.01) -> None:
    """How late the load generator's own event loop wakes: its TTFT readings are late
    by as much (the machine's other load shows here)."""
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(period)
        out.append(time.perf_counter() - t0 - period)


async def offered_load(
    url: str, rate: float, duration: float, seed: int, shape: Shape
) -> list[Shot]:
    rng = random.Random(seed)
    shots: list[Shot] = []
    tasks: list[asyncio.Task[None]] = []
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()

        async def fire(shot: Shot, headers: dict[str, str], body: dict[str, Any]) -> None:
            try:
                shot.status, shot.ttft, shot.reason = await _one(session, url, headers, body)
            except (aiohttp.ClientError, TimeoutError):
                shot.status = -1

        t = 0.0
        while True:
            t += rng.expovariate(rate)
            if t >= duration:
                break
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            name, objective, tenant = pick_class(rng.random())
            shot = Shot(name, time.perf_counter() - start)
            shots.append(shot)
            headers = {
                "x-llm-d-inference-objective": objective,
                "x-llm-d-inference-fairness-id": tenant,
            }
            tasks.append(asyncio.create_task(fire(shot, headers, _body(rng, shape))))
        await asyncio.gather(*tasks)
    return shots


async def run_mode(
    flow_control: bool, args: argparse.Namespace, rate: float | None
) -> tuple[Run, float, float]:
    shape: Shape = args.shape
    workdir = Path(tempfile.mkdtemp(prefix="disagg-fc-bench-"))
    objects = workdir / "objects.yaml"
    objects.write_text(OBJECTS)
    options = StackOptions(
        prefill=0,
        decode=shape.engines,
        gateway_port=0,
        workdir=workdir,
        sim_args=shape.sim_args(),
        epp_args=[f"--api-objects-file={objects}", "--allow-experimental-plugins"],
        epp_config=epp_config(workdir, flow_control, args.min_ceiling, args.fairness, shape.batch),
    )
    stack = LocalStack(options)
    await stack.start()
    try:
        url = f"{stack.gateway_url}/v1/chat/completions"
        service = await service_time(url, shape)
        base_ttft = await unloaded_ttft(url, shape)
        if rate is None:
            rate = args.load * shape.slots / service
        assert stack.epp is not None
        assert stack.epp.pid is not None
        epp = psutil.Process(stack.epp.pid)
        cpu0 = sum(epp.cpu_times()[:2])
        mode = "on" if flow_control else "off"
        print(
            f"flow control {mode}: {rate:.1f} req/s for {args.duration:.0f}s "
            f"(service {service * 1000:.0f} ms, unloaded TTFT {base_ttft * 1000:.0f} ms)",
            file=sys.stderr,
        )
        t0 = time.perf_counter()
        lags: list[float] = []
        monitor = asyncio.create_task(loop_lag(lags))
        try:
            shots = await offered_load(url, rate, args.duration, args.seed, shape)
        finally:
            monitor.cancel()
        run = Run(mode, shots, time.perf_counter() - t0, sum(epp.cpu_times()[:2]) - cpu0)
        run.client_lag_p99 = percentile(sorted(lags), 99) if lags else 0.0
        if flow_control:
            run.queue_wait = await epp_queue_waits(stack.epp_metrics_port)
    finally:
        await stack.stop()
    return run, rate, base_ttft


def decision_overhead(
    queued: int = 1000,
    samples: int = 2000,
    fairness: str = "program-aware-fairness",
    engines: int = Shape.engines,
) -> dict[str, float]:
    """In process: enqueue and dispatch-cycle cost with ``queued`` requests waiting."""
    from epp.datastore import Endpoint
    from epp.flowcontrol.controller import BandSpec, ControllerConfig, FlowController
    from epp.flowcontrol.fairness import (
        FairnessPolicy,
        ProgramAwareFairness,
        RoundRobinFairness,
    )
    from epp.flowcontrol.item import FlowItem, FlowKey
    from epp.flowcontrol.saturation import ConcurrencyDetector, ConcurrencyParams

    async def measure() -> dict[str, float]:
        policy: FairnessPolicy = (
            ProgramAwareFairness() if fairness == "program-aware-fairness" else RoundRobinFairness()
        )
        pool = [Endpoint(f"e{i}", f"10.0.0.{i + 1}", 8000) for i in range(engines)]
        cfg = ControllerConfig(
            bands={100: BandSpec(), 0: BandSpec(fairness=policy), -10: BandSpec()}
        )
        ctl = FlowController(
            cfg, ConcurrencyDetector(ConcurrencyParams(maxConcurrency=1)), lambda: pool
        )
        ctl._running = True
        for _ in range(engines):
            ctl.ledger.add(pool[_].key, 0)  # saturated: everything queues
        rng = random.Random(3)
        keys = [FlowKey(f"t{rng.randrange(10)}", rng.choice((100, 0, -10))) for _ in range(queued)]
        waiters = [asyncio.create_task(ctl.enqueue_and_wait(FlowItem(k))) for k in keys]
        await asyncio.sleep(0)
        enq, cycle = [], []
        for _ in range(samples):
            item = FlowItem(FlowKey(f"t{rng.randrange(10)}", rng.choice((100, 0, -10))))
            t0 = time.perf_counter()
            w = asyncio.ensure_future(ctl.enqueue_and_wait(item))
            await asyncio.sleep(0)  # runs the enqueue up to its wait
            enq.append(time.perf_counter() - t0)
            ctl.ledger.remove(pool[0].key, 0)  # one slot frees
            t0 = time.perf_counter()
            ctl.dispatch_once()
            cycle.append(time.perf_counter() - t0)
            ctl.ledger.unreserve(0)
            ctl.ledger.add(pool[0].key, 0)
            waiters.append(w)
        assert ctl.queued == queued
        await ctl.stop()
        await asyncio.gather(*waiters)
        enq.sort()
        cycle.sort()
        return {
            "enqueue_p50_us": percentile(enq, 50) * 1e6,
            "enqueue_p99_us": percentile(enq, 99) * 1e6,
            "dispatch_p50_us": percentile(cycle, 50) * 1e6,
            "dispatch_p99_us": percentile(cycle, 99) * 1e6,
        }

    return asyncio.run(measure())


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def summarize(run: Run, base_ttft: float) -> dict[str, Any]:
    by_cls: dict[str, list[Shot]] = defaultdict(list)
    for s in run.shots:
        by_cls[s.cls].append(s)
    classes = {}
    for name, shots in by_cls.items():
        ttfts = sorted(s.ttft for s in shots if s.status == 200 and s.ttft is not None)
        classes[name] = {
            "sent": len(shots),
            "ok": len(ttfts),
            "ttft_p50_ms": percentile(ttfts, 50) * 1000 if ttfts else None,
            "ttft_p99_ms": percentile(ttfts, 99) * 1000 if ttfts else None,
            "p99_over_unloaded": percentile(ttfts, 99) / base_ttft if ttfts else None,
            "epp_queue_p50_le_ms": _ms(run.queue_wait.get(name, (None, None))[0]),
            "epp_queue_p99_le_ms": _ms(run.queue_wait.get(name, (None, None))[1]),
            "shed": dict(
                Counter(f"{s.status} {s.reason}".strip() for s in shots if s.status != 200)
            ),
        }
    ok = sum(1 for s in run.shots if s.status == 200)
    return {
        "mode": run.mode,
        "sent": len(run.shots),
        "goodput_rps": ok / run.duration,
        "epp_cpu_ms_per_request": run.epp_cpu_s / max(1, len(run.shots)) * 1000,
        "client_loop_lag_p99_ms": run.client_lag_p99 * 1000,
        "classes": classes,
    }


def render(
    results: list[dict[str, Any]], base: dict[str, float], overhead: dict[str, float]
) -> str:
    lines = [
        "| mode | class | sent | ok | TTFT p50 ms | TTFT p99 ms | p99 / unloaded "
        "| EPP queue p50 / p99 ms | refused |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, c in sorted(r["classes"].items()):

            def f(v: float | None) -> str:
                return "-" if v is None else f"{v:.0f}"

            ratio = "-" if c["p99_over_unloaded"] is None else f"{c['p99_over_unloaded']:.1f}x"
            shed = ", ".join(f"{k}: {v}" for k, v in sorted(c["shed"].items())) or "-"
            wait = "-"
            if c["epp_queue_p99_le_ms"] is not None:
                wait = f"≤ {c['epp_queue_p50_le_ms']:g} / ≤ {c['epp_queue_p99_le_ms']:g}"
            lines.append(
                f"| {r['mode']} | {name} | {c['sent']} | {c['ok']} | "
                f"{f(c['ttft_p50_ms'])} | {f(c['ttft_p99_ms'])} | {ratio} | {wait} | {shed} |"
            )
    lines.append("")
    lines.append(
        "| mode | goodput req/s | EPP CPU ms/request | unloaded TTFT ms "
        "| load generator loop lag p99 ms |"
    )
    lines.append("|---|---|---|---|---|")
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['goodput_rps']:.1f} | "
            f"{r['epp_cpu_ms_per_request']:.2f} | {base[r['mode']] * 1000:.0f} | "
            f"{r['client_loop_lag_p99_ms']:.0f} |"
        )
    lines.append("")
    lines.append(
        f"Flow-control decision with 1,000 queued (in process): enqueue p50 "
        f"{overhead['enqueue_p50_us']:.0f} us (p99 {overhead['enqueue_p99_us']:.0f}), dispatch "
        f"cycle p50 {overhead['dispatch_p50_us']:.0f} us (p99 {overhead['dispatch_p99_us']:.0f})."
    )
    return "\n".join(lines)


COLORS = {
    "critical": "#d62728",
    "standard/flood": "#1f77b4",
    "standard/quiet": "#2ca02c",
    "sheddable": "#7f7f7f",
}


def svg(runs: list[Run], path: Path) -> None:
    """TTFT over time per class, one panel per mode (points: served requests)."""
    w, h, pad = 520, 260, 40
    top = max((s.ttft for r in runs for s in r.shots if s.ttft), default=1.0)
    span = max((r.duration for r in runs), default=1.0)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h + 30}" '
        'font-family="sans-serif" font-size="11">'
    ]
    for i, run in enumerate(runs):
        x0 = i * w
        parts.append(
            f'<text x="{x0 + pad}" y="14">flow control {run.mode}: TTFT (s) over '
            f"time (s), max {top:.1f}s</text>"
        )
        parts.append(
            f'<rect x="{x0 + pad}" y="20" width="{w - 2 * pad}" height="{h - 40}" '
            'fill="none" stroke="#999"/>'
        )
        for s in run.shots:
            if s.ttft is None:
                continue
            x = x0 + pad + s.sent / span * (w - 2 * pad)
            y = 20 + (h - 40) * (1 - s.ttft / top)
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.5" fill="{COLORS.get(s.cls, "#000")}"/>'
            )
        parts.append(
            f'<text x="{x0 + pad}" y="{h - 5}">0</text>'
            f'<text x="{x0 + w - pad - 20}" y="{h - 5}">{span:.0f}</text>'
        )
    for j, (name, color) in enumerate(COLORS.items()):
        parts.append(
            f'<circle cx="{pad + j * 150}" cy="{h + 15}" r="4" fill="{color}"/>'
            f'<text x="{pad + j * 150 + 8}" y="{h + 19}">{name}</text>'
        )
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--load", type=float, default=2.0, help="offered load / capacity")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--min-ceiling",
        type=float,
        default=0.625,
        help="priority-holdback-policy minCeiling with flow control on (0: no usage limit)",
    )
    parser.add_argument(
        "--fairness",
        choices=("round-robin-fairness-policy", "program-aware-fairness"),
        default="program-aware-fairness",
        help="the standard band's fairness policy with flow control on",
    )
    defaults = Shape()
    parser.add_argument("--engines", type=int, default=defaults.engines)
    parser.add_argument("--batch", type=int, default=defaults.batch, help="batch slots per engine")
    parser.add_argument(
        "--prompt-words", type=int, default=defaults.prompt_words, help="prompt tokens"
    )
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--svg", type=Path)
    args = parser.parse_args()
    args.shape = Shape(args.engines, args.batch, args.prompt_words, args.max_tokens)
    runs, results, base = [], [], {}
    rate = None
    for on in (False, True):
        run, rate, base_ttft = asyncio.run(run_mode(on, args, rate))
        runs.append(run)
        base[run.mode] = base_ttft
        results.append(summarize(run, base_ttft))
    overhead = decision_overhead(fairness=args.fairness, engines=args.shape.engines)
    print(render(results, base, overhead))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rate": rate, "results": results, "unloaded": base, "decision": overhead}, indent=1
            )
        )
    if args.svg:
        svg(runs, args.svg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
