"""Soak run: mixed load with random faults through Envoy, the EPP and the sidecars, then
leak checks.

    python benchmarks/soak.py                      # three minutes
    python benchmarks/soak.py --duration 30        # the short run in .ci/run

The local stack (two prefill and two decode simulated engines, a sidecar per decode
engine, the EPP, real Envoy) takes closed-loop load: streaming and non-streaming chat and
completions, repeated and fresh prompts. Before a share of the requests the worker arms
one random fault on a random engine (refusals, 5xx, hangs past the sidecar's timeouts,
garbage, missing KV parameters, failed KV pulls, streams cut before or after the first
chunk) or walks away from its own request part-way. Faults are armed on shared engines,
so the request they hit is not always the one that armed them; every request is judged on
what it got:

* ``ok``: a 200 whose JSON or event stream is complete;
* ``clean error``: an error status with a JSON error body, or a stream that ends with an
  error event;
* ``client left``: the worker walked away on purpose;
* anything else (no answer within the deadline, a reset, a broken body, a stream that
  stops without saying why) is ``unclean`` and fails the run.

Leaks are measured on the sidecars and the EPP with no gateway attached: after warm-up
Envoy is stopped and the baseline taken, Envoy comes back for the load, and at the end it
stops again. The final level of open file descriptors, asyncio tasks
(``python_asyncio_tasks``), upstream connections, sockets in CLOSE_WAIT and memory must
return to the baseline (memory within a tolerance); the logs must hold no traceback.
Exit status 1 when anything is unclean or leaked. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.local_stack import LocalStack, StackOptions
from examples.local_stack.flow_control import flow_control_config
from examples.local_stack.processes import ManagedProcess
from examples.local_stack.stack import default_epp_config
from vllm_sim.engine import PULL_PATH

REQUEST_DEADLINE_S = 20.0  # well past every sidecar timeout below: beyond it is a hang
QUIESCE_DEADLINE_S = 30.0
MEMORY_TOLERANCE = (16 * 2**20, 0.10)  # bytes, fraction of the baseline: the larger wins
SIDECAR_ARGS = [
    "--prefill-timeout=1s",
    "--decode-first-byte-timeout=2s",
    "--stream-idle-timeout=1s",
    "--pool-keepalive-timeout=1s",
    "--prefill-retry-backoff=10ms",
]
# The EPP scrapes every decode pod through its sidecar. At the default 50 ms, that traffic
# alone keeps every pooled connection to the local engine fresh (aiohttp reuses idle
# connections in turn), so the pools could never be seen shrinking; once a second lets
# them drain to the one connection the scrape uses.
EPP_ARGS = ["--refresh-metrics-interval=1s", "--metrics-staleness-threshold=5s"]
# The approximate prefix index holds up to lruCapacityPerServer blocks per endpoint (31,250
# by default, tens of MiB once full). A small bound fills during the warm-up, so what the
# memory check sees afterwards is growth that no bound explains.
PREFIX_INDEX_CAPACITY = 256
WARM_UP_S = 6.0
SCRAPE_SLACK = 1  # that one connection (a socket, and the server task serving it)
PROMPT_WORDS = ["prefill", "decode", "cache", "block", "engine", "token", "stream", "latency"]

# An engine's queue and running batch, under vLLM's names and SGLang's (SGLang mode).
_BUSY_SERIES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "sglang:num_running_reqs",
    "sglang:num_queue_reqs",
)


@dataclass(frozen=True)
class FaultSpec:
    """One kind of trouble: where it is armed and the simulator fault that causes it."""

    name: str
    role: str  # "prefill" | "decode" | "client"
    fault: dict[str, Any] = field(default_factory=dict)
    paths: tuple[str, ...] | None = None


FAULTS = [
    FaultSpec("prefill 503", "prefill", {"kind": "status", "status": 503}),
    FaultSpec("prefill 500", "prefill", {"kind": "status", "status": 500}),
    FaultSpec("prefill hangs", "prefill", {"kind": "hang"}),
    FaultSpec("prefill slow", "prefill", {"kind": "delay", "delay_ms": 300}),
    FaultSpec("prefill garbage", "prefill", {"kind": "malformed_json"}),
    FaultSpec("prefill drops", "prefill", {"kind": "disconnect"}),
    FaultSpec("prefill cut mid-answer", "prefill", {"kind": "truncate"}),
    FaultSpec("no KV params", "prefill", {"kind": "omit_kv_transfer_params"}),
    FaultSpec("KV pull refused", "prefill", {"kind": "status", "status": 500}, (PULL_PATH,)),
    FaultSpec("decode 500", "decode", {"kind": "status", "status": 500}),
    FaultSpec("decode hangs", "decode", {"kind": "hang"}),
    FaultSpec("decode drops at once", "decode", {"kind": "disconnect", "after_chunks": 0}),
    FaultSpec("decode drops mid-stream", "decode", {"kind": "disconnect", "after_chunks": 3}),
    FaultSpec("decode cut mid-answer", "decode", {"kind": "truncate"}),
    FaultSpec("client leaves", "client"),
]


@dataclass
class Tally:
    requests: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    unclean: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Level:
    """What one process holds at a quiet moment."""

    files: int  # open descriptors that are not sockets
    sockets: int  # TCP connections in any state but LISTEN
    upstream: int  # established TCP connections to the engines
    close_wait: int
    tasks: int
    open_work: int  # the sidecar's requests in flight, the EPP's open ext_proc streams
    rss: int

    def within(self, baseline: Level) -> bool:
        """No more held than at the baseline, but for the scrape's connection."""
        return not self.excess(baseline)

    def excess(self, baseline: Level) -> list[str]:
        over = []
        for what, now, was, slack in (
            ("open files", self.files, baseline.files, 0),
            ("TCP connections", self.sockets, baseline.sockets, SCRAPE_SLACK),
            ("upstream connections", self.upstream, baseline.upstream, SCRAPE_SLACK),
            ("asyncio tasks", self.tasks, baseline.tasks, SCRAPE_SLACK),
        ):
            if now > was + slack:
                over.append(f"{what} {was} -> {now}")
        if self.open_work:
            over.append(f"{self.open_work} requests or ext_proc streams still open")
        if self.close_wait:
            over.append(f"{self.close_wait} sockets in CLOSE_WAIT")
        allowed = max(MEMORY_TOLERANCE[0], int(baseline.rss * MEMORY_TOLERANCE[1]))
        if self.rss - baseline.rss > allowed:
            over.append(f"memory {baseline.rss / 2**20:.1f} -> {self.rss / 2**20:.1f} MiB")
        return over


# -- load ------------------------------------------------------------------------------
def _request(rng: random.Random) -> tuple[str, dict[str, Any]]:
    fresh = rng.random() < 0.6  # the rest repeat a prompt: decode-only on a warm pod
    words = rng.choices(PROMPT_WORDS, k=rng.randint(20, 120))
    prompt = " ".join(words) if fresh else " ".join(PROMPT_WORDS * rng.randint(3, 6))
    body: dict[str, Any] = {"model": "sim-model", "max_tokens": rng.randint(4, 24)}
    if rng.random() < 0.5:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.7:
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


async def _judge(resp: aiohttp.ClientResponse, stream: bool) -> str:
    """The outcome of one answered request (see the module docstring)."""
    raw = await resp.read()
    if resp.status != 200:
        try:
            error = json.loads(raw).get("error")
        except (ValueError, AttributeError):
            return f"unclean: {resp.status} with a non-JSON body {raw[:80]!r}"
        return "clean error" if error else f"unclean: {resp.status} without an error object"
    if not stream:
        try:
            answer = json.loads(raw)
        except ValueError:
            return f"unclean: 200 with a broken body {raw[:80]!r}"
        complete = answer.get("choices") and answer.get("usage")
        return "ok" if complete else f"unclean: 200 missing choices/usage {raw[:80]!r}"
    events = [
        line[6:] for line in raw.decode(errors="replace").split("\n") if line.startswith("data: ")
    ]
    if events and events[-1] == "[DONE]":
        events = events[:-1]
        done = True
    else:
        done = False
    for event in events:
        try:
            if "error" in json.loads(event):
                return "clean error"  # an error event ends a stream that already began
        except ValueError:
            return f"unclean: stream event that is not JSON {event[:80]!r}"
    return "ok" if done else "unclean: stream ended without [DONE] or an error event"


async def _one(
    session: aiohttp.ClientSession, gateway: str, rng: random.Random, walk_away: bool
) -> str:
    path, body = _request(rng)
    stream = bool(body.get("stream"))
    try:
        async with asyncio.timeout(REQUEST_DEADLINE_S):
            if walk_away:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(rng.uniform(0.001, 0.08)):
                        async with session.post(gateway + path, json=body) as resp:
                            await resp.read()
                            return await _judge(resp, stream)  # finished before we left
                return "client left"
            async with session.post(gateway + path, json=body) as resp:
                return await _judge(resp, stream)
    except TimeoutError:
        return f"unclean: no answer within {REQUEST_DEADLINE_S:.0f}s"
    except aiohttp.ClientError as exc:
        return f"unclean: {type(exc).__name__}: {exc}"


async def _arm(session: aiohttp.ClientSession, engine: str, spec: FaultSpec) -> None:
    fault = {**spec.fault, "count": 1, "roles": [spec.role]}
    if spec.paths is not None:
        fault["paths"] = list(spec.paths)
    async with session.post(f"{engine}/sim/faults", json=fault) as resp:
        resp.raise_for_status()


async def run_load(
    stack: LocalStack, duration: float, concurrency: int, fault_rate: float, seed: int
) -> Tally:
    tally = Tally()
    engines = {"prefill": stack.prefill_engine_urls, "decode": stack.decode_engine_urls}
    stop_at = time.monotonic() + duration
    # A fresh connection per request: a walked-away request must not poison a pooled one.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < stop_at:
                spec = rng.choice(FAULTS) if rng.random() < fault_rate else None
                if spec is not None:
                    tally.faults[spec.name] += 1
                    if spec.role != "client":
                        await _arm(session, rng.choice(engines[spec.role]), spec)
                outcome = await _one(
                    session, stack.gateway_url, rng, spec is not None and spec.role == "client"
                )
                tally.requests += 1
                kind, _, detail = outcome.partition(": ")
                tally.outcomes[kind] += 1
                if kind == "unclean":
                    tally.unclean.append(detail)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        for urls in engines.values():  # faults nobody took must not outlive the run
            for url in urls:
                async with session.delete(f"{url}/sim/faults") as resp:
                    resp.raise_for_status()
    return tally


# -- levels ----------------------------------------------------------------------------
async def _scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url) as resp:
        text = await resp.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _engine_ports(stack: LocalStack) -> set[int]:
    urls = stack.prefill_engine_urls + stack.decode_engine_urls
    return {int(url.rsplit(":", 1)[1]) for url in urls}


async def measure(
    stack: LocalStack, session: aiohttp.ClientSession, metrics_urls: dict[str, str]
) -> dict[str, Level]:
    engine_ports = _engine_ports(stack)
    levels = {}
    for proc in _ours(stack):
        assert proc.pid is not None
        held = await asyncio.to_thread(_held, proc.pid, engine_ports)
        scraped = await _scrape(session, metrics_urls[proc.name])
        open_work = (
            scraped.get("pd_sidecar_in_flight_requests", 0)
            + scraped.get("llm_d_epp_extproc_streams_inflight", 0)
            + sum(
                v for k, v in scraped.items() if k.startswith("llm_d_epp_flow_control_queue_size")
            )
        )
        levels[proc.name] = Level(
            **held, tasks=int(scraped["python_asyncio_tasks"]), open_work=int(open_work)
        )
    return levels


def _held(pid: int, engine_ports: set[int]) -> dict[str, int]:
    """Descriptors, connections and memory of one process, from /proc (blocking)."""
    ps = psutil.Process(pid)
    conns = [c for c in ps.net_connections(kind="tcp") if c.status != "LISTEN"]
    sockets = sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir() if _is_socket(fd))
    return {
        "files": ps.num_fds() - sockets,
        "sockets": len(conns),
        "upstream": sum(
            1
            for c in conns
            if c.raddr and c.raddr.port in engine_ports and c.status == "ESTABLISHED"
        ),
        "close_wait": sum(1 for c in conns if c.status == "CLOSE_WAIT"),
        "rss": ps.memory_info().rss,
    }


def _is_socket(fd: Path) -> bool:
    try:
        return fd.readlink().name.startswith("socket:")
    except OSError:  # closed while we looked
        return False


def _ours(stack: LocalStack) -> list[ManagedProcess]:
    return [p for p in stack.processes if p.name.startswith("sidecar-") or p.name == "epp"]


def _metrics_urls(stack: LocalStack) -> dict[str, str]:
    """Each sidecar's and the EPP's metrics endpoint, from its command line."""
    return {
        proc.name: f"http://127.0.0.1:{proc.flag('metrics-port')}/metrics" for proc in _ours(stack)
    }


async def _wait_for(check: Callable[[], Awaitable[bool]], what: str, deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    print(f"  {what}: not reached within {deadline_s:.0f}s", file=sys.stderr)
    return False


async def quiesce(
    stack: LocalStack,
    session: aiohttp.ClientSession,
    metrics_urls: dict[str, str],
    target: dict[str, Level] | None,
) -> None:
    """Wait until nothing is in flight anywhere and the pools have let go (bounded)."""

    async def idle() -> bool:
        for name, url in metrics_urls.items():
            scraped = await _scrape(session, url)
            if name.startswith("sidecar-") and scraped["pd_sidecar_in_flight_requests"] > 0:
                return False
        for engine in stack.prefill_engine_urls + stack.decode_engine_urls:
            values = await _scrape(session, f"{engine}/metrics")
            busy = sum(v for k, v in values.items() if k.startswith(_BUSY_SERIES))
            if busy > 0:
                return False
        return True

    await _wait_for(idle, "requests in flight", QUIESCE_DEADLINE_S)
    if target is not None:

        async def released() -> bool:
            now = await measure(stack, session, metrics_urls)
            return all(now[name].within(level) for name, level in target.items())

        await _wait_for(released, "resources back to baseline", QUIESCE_DEADLINE_S)


async def _sidecars_let_go(
    stack: LocalStack, session: aiohttp.ClientSession, metrics_urls: dict[str, str]
) -> bool:
    levels = await measure(stack, session, metrics_urls)
    return all(level.upstream <= SCRAPE_SLACK for name, level in levels.items() if name != "epp")


async def restart_envoy(stack: LocalStack, session: aiohttp.ClientSession, *, up: bool) -> None:
    assert stack.envoy is not None
    if up:
        await stack.envoy.start()
        await stack.envoy.wait_ready(session)
    else:
        await stack.envoy.stop()


def leaks(before: dict[str, Level], after: dict[str, Level]) -> list[str]:
    return [f"{name}: {item}" for name, b in before.items() for item in after[name].excess(b)]


def log_alarms(stack: LocalStack) -> list[str]:
    return [f"{p.name}: {line.strip()[:160]}" for p in _ours(stack) for line in p.log_alarms()]


# -- report ----------------------------------------------------------------------------
def table(
    tally: Tally,
    elapsed: float,
    before: dict[str, Level],
    after: dict[str, Level],
    found: list[str],
) -> str:
    rows = [
        ("requests", f"{tally.requests} in {elapsed:.0f}s ({tally.requests / elapsed:.0f}/s)"),
        *((f"fault: {name}", str(n)) for name, n in sorted(tally.faults.items())),
        *((f"outcome: {name}", str(n)) for name, n in sorted(tally.outcomes.items())),
    ]
    for name in before:
        b, a = before[name], after[name]
        rows.append(
            (
                f"{name} before -> after",
                f"files {b.files}->{a.files}, tcp {b.sockets}->{a.sockets}, "
                f"upstream {b.upstream}->{a.upstream}, close-wait {a.close_wait}, "
                f"tasks {b.tasks}->{a.tasks}, open {a.open_work}, "
                f"rss {b.rss / 2**20:.1f}->{a.rss / 2**20:.1f} MiB",
            )
        )
    rows.append(("leaks and log alarms", str(len(found))))
    rows.extend(("", item) for item in found[:20])
    rows.extend(("unclean", item) for item in tally.unclean[:20])
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def epp_config(workdir: Path, flow_control_batch: int | None = None) -> Path:
    """The local stack's P/D configuration with a small prefix index (see above); with
    ``flow_control_batch``, flow control on and at most that many requests dispatched at
    once, so that requests queue in the EPP."""
    config = yaml.safe_load(default_epp_config(workdir / "endpoints.yaml", 16))
    for plugin in config["plugins"]:
        if plugin["type"] == "prefix-cache-scorer":
            plugin["parameters"] = {"lruCapacityPerServer": PREFIX_INDEX_CAPACITY}
    text = yaml.safe_dump(config, sort_keys=False)
    if flow_control_batch is not None:
        text = flow_control_config(text, batch=flow_control_batch)
    path = workdir / "epp-soak-config.yaml"
    path.write_text(text)
    return path


async def soak(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="disagg-soak-"))
    options = StackOptions(
        prefill=2,
        decode=2,
        gateway_port=0,
        workdir=workdir,
        sidecar_args=SIDECAR_ARGS,
        sim_args=["--kv-load-failure-policy", "fail"],
        epp_args=EPP_ARGS,
        epp_config=epp_config(
            workdir, max(1, args.concurrency // 2) if args.flow_control else None
        ),
    )
    stack = LocalStack(options)
    await stack.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            urls = _metrics_urls(stack)
            print(f"soak: warming up (logs in {workdir})", file=sys.stderr)
            await run_load(stack, WARM_UP_S, args.concurrency, 0.0, args.seed + 1)
            await restart_envoy(stack, session, up=False)
            await quiesce(stack, session, urls, None)
            await _wait_for(
                lambda: _sidecars_let_go(stack, session, urls),
                "sidecar pools emptied by --pool-keepalive-timeout",
                QUIESCE_DEADLINE_S,
            )
            before = await measure(stack, session, urls)
            await restart_envoy(stack, session, up=True)
            print(f"soak: {args.duration:.0f}s at concurrency {args.concurrency}", file=sys.stderr)
            started = time.monotonic()
            tally = await run_load(
                stack, args.duration, args.concurrency, args.fault_rate, args.seed
            )
            elapsed = time.monotonic() - started
            await restart_envoy(stack, session, up=False)
            await quiesce(stack, session, urls, before)
            after = await measure(stack, session, urls)
    finally:
        await stack.stop()
    found = leaks(before, after) + log_alarms(stack)
    print(table(tally, elapsed, before, after, found))
    if args.json:
        figures = {
            "requests": tally.requests,
            "seconds": elapsed,
            "faults": dict(tally.faults),
            "outcomes": dict(tally.outcomes),
            "leaks": found,
            "before": {n: vars(v) for n, v in before.items()},
            "after": {n: vars(v) for n, v in after.items()},
        }
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(figures, indent=1))
    return 1 if found or tally.unclean or not tally.requests else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--fault-rate", type=float, default=0.25, help="share of requests")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default="", help="also write the figures here")
    parser.add_argument(
        "--flow-control",
        action="store_true",
        help="EPP flow control on, dispatching at most half the concurrency at once",
    )
    sys.exit(asyncio.run(soak(parser.parse_args())))


if __name__ == "__main__":
    main()
