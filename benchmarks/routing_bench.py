"""Routing quality at fleet scale: the same open-loop traffic through real Envoy and the EPP
to a simulated pool, once per scheduler configuration.

The pool is ``vllm-sim --fleet N`` (one process, N engines, each with the latency model
below and its own paged prefix cache; engines publish KV events for the precise
configuration). P/D runs get their own fleet on consecutive ports: a quarter of the
engines prefill, the rest decode behind one sidecar process serving them as ranks.

Configurations (EPP configs in llm-d's vocabulary, see ``epp_config``):

- ``random``: random picker;
- ``least-requests``: the EPP's own in-flight count (active-request-scorer), the
  load balancer's round-robin/least-request stand-in;
- ``load``: queue-scorer + kv-cache-utilization-scorer, no prefix knowledge;
- ``llm-d-default``: llm-d's sample epp-config.yaml (prefix-cache-scorer, weight 2, alone);
- ``approx-prefix``: approximate prefix (weight 3) + KV utilisation (2) + queue (2), the
  weights of llm-d's inference-scheduling guide;
- ``precise-prefix``: the precise (KV-event) producer + prefix (2) + KV (1) + queue (1), as
  llm-d's epp-precise-prefix-cache-config.yaml;
- ``approx-tuned`` / ``precise-tuned``: the same producers with the queue weighted above
  the prefix (prefix 2, queue 3, KV 1): a conversation stays where its prefix is until a
  queue forms there, then moves;
- ``approx-backlog`` / ``precise-backlog``: the approximate or precise producer and this
  EPP's ``disagg-prefill-backlog-scorer`` alone (the endpoint that would compute the
  uncached prompt soonest, counting the uncached prompt tokens in flight before it);
  ``approx-backlog-prefix`` adds the prefix-cache scorer (backlog 3, prefix 1);
- ``pd``: prefill/decode disaggregation (prefix-based P/D decider) as llm-d's
  pd-epp-config.yaml, with a quarter of the engines prefilling; ``pd-tuned``: queue
  weight 3 in both profiles and only prompts with 512 or more uncached tokens prefilled
  remotely; ``pd-tuned-all``: the same weights with llm-d's threshold (16 tokens), so
  that decode engines compute (almost) no prompts; ``pd-backlog``: llm-d's threshold,
  prefillers picked by ``disagg-prefill-backlog-scorer`` (the prefill work ahead of
  each) and decoders by ``active-request-scorer`` (the fewest requests in flight).

Each run sends ``--warmup`` seconds of the traffic before the ``--duration`` seconds
that are measured (conversations reach their steady mix of turns, caches fill); every
figure counts only the requests that arrive after the warm-up.

Per configuration: TTFT p50/p90/p99, the ideal p99 (the same requests on idle engines
holding every earlier prompt), inter-token latency (mean, and p99 of the requests'
means), the shares of requests with TTFT within 0.25, 0.5 and 1 s and the SLO (``--slo``,
0.5 s by default), the pool's prefix-cache hit rate against the oracle's (the best any
engine held for each prompt, computed in the simulator), the pool's busy share (below),
requests sent to prefill, EPP CPU per request, decision latency (the EPP's
request-processing histogram: receipt to the routing decision; ``--long-prompts`` and
the smoke also time every decision exactly, from the EPP's debug line for it) and EPP
peak memory. ``--epp-cpus`` gives the EPP CPUs of its own, the rest of the stack
running on the others, as when it has cores of its own.

Load is relative to the pool's capacity: ``N / (ttft_base + mean prompt x per-token
prefill time)`` requests/s, the rate at which the pool would be busy computing prompts
if nothing were ever reused. What a load means for a configuration is its ``pool busy``
share: the model time the engines spent computing prompts over the pool's time (each
engine computes one prompt at a time, so 100% is the pool's capacity with that router).

    python benchmarks/routing_bench.py --engines 32 --workload chat --load 0.8
    python benchmarks/routing_bench.py --sweep 0.4,0.6,0.8,1.0 --plot out.png
    python benchmarks/routing_bench.py --scale 8,32,128
    python benchmarks/routing_bench.py --long-prompts      # 96 engines, 240K-token prompts
    python benchmarks/routing_bench.py --long-prompts --epp-cpus 0
    python benchmarks/routing_bench.py --smoke             # about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.routing_workloads import Request, generate, mean_prompt_tokens
from epp.envoy_config import gateway_config
from examples.local_stack.processes import (
    EnvoyProcess,
    ManagedProcess,
    free_port,
    wait_until,
)
from vllm_sim.block_hash import chain_hashes
from vllm_sim.tokens import tokenize

CONFIGS = (
    "random",
    "least-requests",
    "load",
    "llm-d-default",
    "approx-prefix",
    "precise-prefix",
    "approx-tuned",
    "precise-tuned",
    "approx-backlog",
    "approx-backlog-prefix",
    "precise-backlog",
    "pd",
    "pd-tuned",
    "pd-tuned-all",
    "pd-backlog",
)
MODEL = "sim-model"
ROLE_LABEL = "llm-d.ai/role"
T = TypeVar("T")
# TTFT targets (model seconds) whose shares every run reports, next to the SLO's.
TTFT_TARGETS_S = (0.25, 0.5, 1.0)


@dataclass(frozen=True)
class EngineModel:
    """The simulated engine (a modest accelerator: 4000 prompt tokens/s)."""

    block_size: int = 16
    num_blocks: int = 4096  # 64K tokens of KV per engine
    max_model_len: int = 32768
    max_num_seqs: int = 32
    ttft_base_ms: float = 20.0
    prefill_ms_per_token: float = 0.25
    itl_ms: float = 15.0
    itl_ms_per_running: float = 0.5
    stream_interval_tokens: int = 8
    # A step's token budget (vLLM's chunked prefill): decode steps taken while the engine
    # computes a prompt also compute a chunk of it. 0: they are not slowed.
    max_num_batched_tokens: int = 0
    # The benchmark runs the model five times slower than the figures it reports (which
    # are in model time): a shared machine keeps up with the request rate.
    time_scale: float = 0.2

    def flags(self) -> list[str]:
        return [
            f"--block-size={self.block_size}",
            f"--num-blocks={self.num_blocks}",
            f"--max-model-len={self.max_model_len}",
            f"--max-num-seqs={self.max_num_seqs}",
            f"--ttft-base-ms={self.ttft_base_ms}",
            f"--prefill-ms-per-token={self.prefill_ms_per_token}",
            f"--itl-ms={self.itl_ms}",
            f"--itl-ms-per-running={self.itl_ms_per_running}",
            f"--stream-interval-tokens={self.stream_interval_tokens}",
            f"--max-num-batched-tokens={self.max_num_batched_tokens}",
            f"--time-scale={self.time_scale}",
            "--serial-prefill",
            "--enable-prompt-tokens-details",
        ]

    def capacity(self, engines: int, mean_prompt: float) -> float:
        service_ms = self.ttft_base_ms + mean_prompt * self.prefill_ms_per_token
        return engines * 1000.0 * self.time_scale / service_ms


# -- EPP configurations --------------------------------------------------------------
def _profile(refs: list[tuple[str, float | None]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for ref, weight in refs:
        entry: dict[str, Any] = {"pluginRef": ref}
        if weight is not None:
            entry["weight"] = weight
        out.append(entry)
    return out


def epp_config(name: str, endpoints_file: Path, *, kv_events_port: int = 0,
               block_size: int = 16, non_cached_tokens: int = 16) -> dict[str, Any]:  # fmt: skip
    """The EndpointPickerConfig of one benchmark configuration."""
    discovery = {
        "type": "file-discovery",
        "parameters": {"path": str(endpoints_file), "watchFile": False},
    }
    plugins: list[dict[str, Any]] = [discovery, {"type": "decode-filter"}]
    refs: list[tuple[str, float | None]] = [("decode-filter", None)]
    picker = "max-score-picker"
    if name == "random":
        picker = "random-picker"
    elif name == "least-requests":
        plugins.append({"type": "active-request-scorer"})
        refs.append(("active-request-scorer", 1))
    elif name == "load":
        plugins += [{"type": "queue-scorer"}, {"type": "kv-cache-utilization-scorer"}]
        refs += [("queue-scorer", 1), ("kv-cache-utilization-scorer", 1)]
    elif name == "llm-d-default":
        plugins.append({"type": "prefix-cache-scorer"})
        refs.append(("prefix-cache-scorer", 2))
    elif name == "approx-prefix":
        plugins += [
            {"type": "prefix-cache-scorer"},
            {"type": "kv-cache-utilization-scorer"},
            {"type": "queue-scorer"},
        ]
        refs += [("prefix-cache-scorer", 3), ("kv-cache-utilization-scorer", 2),
                 ("queue-scorer", 2)]  # fmt: skip
    elif name == "approx-tuned":
        plugins += [
            {"type": "prefix-cache-scorer"},
            {"type": "kv-cache-utilization-scorer"},
            {"type": "queue-scorer"},
        ]
        refs += [("prefix-cache-scorer", 2), ("queue-scorer", 3),
                 ("kv-cache-utilization-scorer", 1)]  # fmt: skip
    elif name == "precise-tuned":
        plugins += [
            {
                "type": "precise-prefix-cache-producer",
                "parameters": {"kvEventsPort": kv_events_port, "blockSize": block_size},
            },
            {"type": "prefix-cache-scorer"},
            {"type": "kv-cache-utilization-scorer"},
            {"type": "queue-scorer"},
        ]
        refs += [("prefix-cache-scorer", 2), ("queue-scorer", 3),
                 ("kv-cache-utilization-scorer", 1)]  # fmt: skip
    elif name in ("approx-backlog", "approx-backlog-prefix", "precise-backlog"):
        if name.startswith("precise"):
            plugins.append({
                "type": "precise-prefix-cache-producer",
                "parameters": {"kvEventsPort": kv_events_port, "blockSize": block_size},
            })  # fmt: skip
        else:
            plugins.append({"type": "approx-prefix-cache-producer"})
        plugins.append({"type": "disagg-prefill-backlog-scorer"})
        refs.append(("disagg-prefill-backlog-scorer", 3))
        if name == "approx-backlog-prefix":
            plugins.append({"type": "prefix-cache-scorer"})
            refs.append(("prefix-cache-scorer", 1))
    elif name == "precise-prefix":
        plugins += [
            {
                "type": "precise-prefix-cache-producer",
                "parameters": {"kvEventsPort": kv_events_port, "blockSize": block_size},
            },
            {"type": "prefix-cache-scorer"},
            {"type": "kv-cache-utilization-scorer"},
            {"type": "queue-scorer"},
        ]
        refs += [("prefix-cache-scorer", 2), ("kv-cache-utilization-scorer", 1),
                 ("queue-scorer", 1)]  # fmt: skip
    elif name in ("pd", "pd-tuned", "pd-tuned-all", "pd-backlog"):
        if name == "pd-backlog":
            # The prefiller with the least prefill work ahead, the decoder with the fewest
            # requests in flight (the approximate producer feeds the decider and backlog).
            scorers = [{"type": "approx-prefix-cache-producer"},
                       {"type": "disagg-prefill-backlog-scorer"},
                       {"type": "active-request-scorer"}]  # fmt: skip
            prefill_scored = [("disagg-prefill-backlog-scorer", 1)]
            decode_scored = [("active-request-scorer", 1)]
        else:
            scorers = [{"type": "prefix-cache-scorer"}, {"type": "queue-scorer"}]
            queue_weight = 1 if name == "pd" else 3
            prefill_scored = decode_scored = [("prefix-cache-scorer", 2),
                                              ("queue-scorer", queue_weight)]  # fmt: skip
        plugins += [
            {"type": "prefill-filter"},
            *scorers,
            {"type": "max-score-picker"},
            {
                "type": "prefix-based-pd-decider",
                "parameters": {"nonCachedTokens": 512 if name == "pd-tuned" else non_cached_tokens},
            },
            {
                "type": "disagg-profile-handler",
                "parameters": {"deciders": {"prefill": "prefix-based-pd-decider"}},
            },
        ]
        picked: list[tuple[str, float | None]] = [("max-score-picker", None)]
        return {
            "apiVersion": "llm-d.ai/v1alpha1",
            "kind": "EndpointPickerConfig",
            "plugins": plugins,
            "schedulingProfiles": [
                {"name": "prefill", "plugins": _profile(
                    [("prefill-filter", None), *picked, *prefill_scored])},
                {"name": "decode", "plugins": _profile(
                    [("decode-filter", None), *picked, *decode_scored])},
            ],
        }  # fmt: skip
    else:
        raise ValueError(f"unknown configuration {name!r} (known: {', '.join(CONFIGS)})")
    plugins += [{"type": picker}, {"type": "single-profile-handler"}]
    refs.append((picker, None))
    return {
        "apiVersion": "llm-d.ai/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": plugins,
        "schedulingProfiles": [{"name": "default", "plugins": _profile(refs)}],
    }


# -- measurements ----------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus-style quantile from cumulative ``(upper bound, count)`` pairs."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            span = count - prev_count
            frac = (rank - prev_count) / span if span else 1.0
            return prev_bound + (bound - prev_bound) * frac
        prev_bound, prev_count = bound, count
    return prev_bound


def _parse_histogram(text: str, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """Summed over label sets: (cumulative buckets, sum, count)."""
    from prometheus_client.parser import text_string_to_metric_families

    by_le: dict[float, float] = {}
    total_sum = total_count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for s in family.samples:
            if s.name == name + "_bucket":
                le = float(s.labels["le"])
                by_le[le] = by_le.get(le, 0.0) + s.value
            elif s.name == name + "_sum":
                total_sum += s.value
            elif s.name == name + "_count":
                total_count += s.value
    return sorted(by_le.items()), total_sum, total_count


def _gauge(text: str, name: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return float(s.value)
    return None


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _proc_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


@dataclass
class Outcome:
    ttft: float
    total: float
    tokens: int
    lag: float  # how late the request left against its schedule


@dataclass
class RunResult:
    config: str
    engines: int
    workload: str
    load: float
    rate: float
    sent: int = 0
    ok: int = 0
    errors: int = 0
    ttft_p50: float = math.nan
    ttft_p90: float = math.nan
    ttft_p99: float = math.nan
    ideal_ttft_p99: float = math.nan  # of the same requests, on idle engines holding all
    itl_mean: float = math.nan
    itl_p99: float = math.nan  # of the requests' mean inter-token latencies
    within_slo: float = math.nan
    # The share within each of TTFT_TARGETS_S and the SLO, by target in seconds ("0.25").
    within: dict[str, float] = field(default_factory=dict)
    goodput_rps: float = math.nan
    hit_rate: float = math.nan
    oracle_hit_rate: float = math.nan
    # The share of the pool's time its engines spent computing prompts (the engines
    # compute one prompt at a time: 100% is the pool's capacity): the prompt work done
    # from the warm-up's end until the last request is answered, over the measured
    # window, so the queue drained after the window counts too.
    busy: float = math.nan
    prefill_requests: int = 0
    epp_cpu_ms_per_request: float = math.nan
    decision_mean_ms: float = math.nan
    decision_p99_ms: float = math.nan
    schedule_mean_ms: float = math.nan
    epp_peak_rss_mb: float = math.nan
    send_lag_p99_ms: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)


def request_body(req: Request, token_ids: bool = False) -> bytes:
    """The completions body of ``req``: text, or the simulator's token ids for the text."""
    prompt: str | list[int] = tokenize(req.prompt) if token_ids else req.prompt
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": req.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    return json.dumps(body).encode()


async def _one(session: aiohttp.ClientSession, url: str, req: Request, body: bytes, t0: float,
               timeout_s: float) -> Outcome | None:  # fmt: skip
    headers = {"x-session-id": req.session, "content-type": "application/json"}
    start = time.monotonic()
    lag = start - (t0 + req.at)
    first = 0.0
    tail = b""
    try:
        async with session.post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            if resp.status != 200:
                await resp.read()
                return None
            async for chunk in resp.content.iter_any():
                if not first and chunk.strip():
                    first = time.monotonic()
                tail = (tail + chunk)[-4096:]
    except (aiohttp.ClientError, TimeoutError):
        return None
    end = time.monotonic()
    tokens = 0
    for line in tail.decode(errors="replace").splitlines():
        if line.startswith("data: {") and '"usage"' in line:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                usage = json.loads(line[6:]).get("usage") or {}
                tokens = int(usage.get("completion_tokens", 0)) or tokens
    if not first:
        return None
    return Outcome(first - start, end - start, tokens, lag)


async def drive(
    url: str,
    requests: list[Request],
    timeout_s: float = 120.0,
    token_ids: bool = False,
    mark: tuple[float, Callable[[], Awaitable[None]]] | None = None,
) -> list[Outcome | None]:
    """Send every request at its time (open loop) and wait for all of them; ``mark``
    (seconds, coroutine function): called that far into the run, as the run goes on."""
    bodies = [request_body(req, token_ids) for req in requests]  # before the clock starts
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.monotonic() + 0.2

        async def at_mark() -> None:
            if mark is not None:
                await asyncio.sleep(max(0.0, t0 + mark[0] - time.monotonic()))
                await mark[1]()

        marker = asyncio.create_task(at_mark())
        try:
            tasks = []
            for req, body in zip(requests, bodies, strict=True):
                delay = t0 + req.at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_one(session, url, req, body, t0, timeout_s)))
            outcomes = list(await asyncio.gather(*tasks))
            await marker
        finally:
            marker.cancel()
        return outcomes


def ideal_ttfts(requests: list[Request], model: EngineModel) -> list[float]:
    """Each request's TTFT (model seconds) on an idle engine that holds every earlier
    prompt, without eviction: its uncached blocks at the model's prefill rate, the
    least any router can reach for it."""
    seen: set[bytes] = set()
    out: list[float] = []
    for req in requests:
        ids = tokenize(req.prompt)
        # The engines' own block hashes: each names its block and every block before it.
        hashes = chain_hashes(ids, model.block_size, None)
        held = next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
        seen.update(hashes)
        uncached = len(ids) - held * model.block_size
        ms = model.ttft_base_ms + uncached * model.prefill_ms_per_token
        out.append(ms / 1000)
    return out


def measured(requests: list[Request], per_request: list[T], warmup_s: float) -> list[T]:
    """What belongs to the requests that arrived after the warm-up."""
    return [x for req, x in zip(requests, per_request, strict=True) if req.at >= warmup_s]


def pool_busy(compute_ms: float, engines: int, duration_s: float, time_scale: float) -> float:
    """The share of ``engines`` x ``duration_s`` (wall seconds, run ``time_scale`` times
    as fast as the model) that ``compute_ms`` of model time spent computing prompts fills."""
    return compute_ms / (engines * duration_s * time_scale * 1000.0)


def summarise(result: RunResult, outcomes: list[Outcome | None], slo_s: float,
              duration_s: float, time_scale: float = 1.0) -> None:  # fmt: skip
    """Latencies in model time (measured x ``time_scale``); the SLO is in model time too."""
    done = [o for o in outcomes if o is not None]
    result.sent = len(outcomes)
    result.ok = len(done)
    result.errors = len(outcomes) - len(done)
    if time_scale != 1.0:
        done = [replace(o, ttft=o.ttft * time_scale, total=o.total * time_scale) for o in done]
    ttfts = [o.ttft for o in done]
    result.ttft_p50 = percentile(ttfts, 0.5)
    result.ttft_p90 = percentile(ttfts, 0.9)
    result.ttft_p99 = percentile(ttfts, 0.99)
    itls = [(o.total - o.ttft) / (o.tokens - 1) for o in done if o.tokens > 1]
    result.itl_mean = sum(itls) / len(itls) if itls else math.nan
    result.itl_p99 = percentile(itls, 0.99)
    good = sum(1 for t in ttfts if t <= slo_s)
    # Failed requests count against the SLO: they were offered and not served in time.
    result.within_slo = good / len(outcomes) if outcomes else math.nan
    result.within = {
        f"{target:g}": sum(1 for t in ttfts if t <= target) / len(outcomes)
        if outcomes
        else math.nan
        for target in _targets(slo_s)
    }
    result.goodput_rps = good / (duration_s * time_scale)
    result.send_lag_p99_ms = percentile([o.lag * 1000 for o in done], 0.99)


# -- the stack -----------------------------------------------------------------------
@dataclass
class _Start:
    """Where a run's measured part starts: the figures taken as the warm-up ends."""

    cpu_s: float = 0.0
    metrics: str = ""
    totals: dict[str, float] = field(default_factory=dict)


class Bench:
    """A fleet, then per configuration an EPP and an Envoy in front of it."""

    def __init__(self, engines: int, model: EngineModel, workdir: Path, *, pd: bool = False,
                 scrape_interval: str = "250ms", token_ids: bool = False,
                 epp_cpus: frozenset[int] = frozenset(),
                 exact_decisions: bool = False) -> None:  # fmt: skip
        self.engines = engines
        # The EPP on these CPUs (the rest of the stack off them); none: shared.
        self.epp_cpus = epp_cpus
        # Every decision's time from the EPP's debug log, not only its histogram.
        self.exact_decisions = exact_decisions
        self.token_ids = token_ids
        self.model = model
        self.workdir = workdir
        self.pd = pd
        self.scrape_interval = scrape_interval
        self.processes: list[ManagedProcess] = []
        self.fleet: ManagedProcess | None = None
        self.control = ""
        self.manifest: dict[str, Any] = {}
        self.kv_events_port = 0
        self.endpoints_file = workdir / ("endpoints-pd.yaml" if pd else "endpoints.yaml")
        self.prefill = max(1, engines // 4) if pd else 0

    async def start(self, session: aiohttp.ClientSession) -> None:
        manifest_path = self.workdir / ("fleet-pd.json" if self.pd else "fleet.json")
        manifest_path.unlink(missing_ok=True)
        control = free_port()
        args = [sys.executable, "-m", "vllm_sim", f"--fleet={self.engines}",
                f"--model={MODEL}", f"--fleet-control-port={control}",
                f"--fleet-manifest={manifest_path}", *self.model.flags()]  # fmt: skip
        if self.pd:
            base = _free_port_run(self.engines)
            args.append(f"--port={base}")
        else:
            self.kv_events_port = free_port()
            args += ["--fleet-distinct-hosts", f"--port={free_port()}",
                     f"--kv-events-port={self.kv_events_port}"]  # fmt: skip
        name = "fleet-pd" if self.pd else "fleet"
        self.fleet = ManagedProcess(name, args, self.workdir)
        self.processes.append(self.fleet)
        await self.fleet.start()
        fleet = self.fleet
        await wait_until(_exists(manifest_path), name, 120, fleet.check_alive)
        self.manifest = json.loads(manifest_path.read_text())
        self.control = f"http://127.0.0.1:{self.manifest['control_port']}"
        entries = []
        engines = self.manifest["engines"]
        if self.pd:
            entries = [_entry(f"prefill-{i}", e["host"], e["port"], "prefill")
                       for i, e in enumerate(engines[: self.prefill])]  # fmt: skip
            decodes = engines[self.prefill :]
            sidecar_base = _free_port_run(len(decodes))
            sidecar = ManagedProcess(
                "sidecar",
                [sys.executable, "-m", "sidecar", f"--port={sidecar_base}",
                 f"--model-server-port={decodes[0]['port']}",
                 f"--data-parallel-size={len(decodes)}", f"--metrics-port={free_port()}",
                 "--listen-host=127.0.0.1", "--kv-connector=nixlv2",
                 "--secure-proxy=false"],
                self.workdir,
            )  # fmt: skip
            self.processes.append(sidecar)
            await sidecar.start()
            await wait_until(
                _http_ok(session, f"http://127.0.0.1:{sidecar_base}/ready"),
                "sidecar", 60, sidecar.check_alive,
            )  # fmt: skip
            entries += [_entry(f"decode-{i}", "127.0.0.1", sidecar_base + i, "decode")
                        for i in range(len(decodes))]  # fmt: skip
        else:
            entries = [_entry(e["name"], e["host"], e["port"], "decode") for e in engines]
        self.endpoints_file.write_text(yaml.safe_dump({"endpoints": entries}, sort_keys=False))

    async def stop(self) -> None:
        for proc in reversed(self.processes):
            await proc.stop()

    async def fleet_stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"{self.control}/fleet/stats") as resp:
            return dict(await resp.json())

    async def reset(self, session: aiohttp.ClientSession) -> None:
        async with session.post(f"{self.control}/fleet/reset") as resp:
            await resp.read()

    async def run_config(self, session: aiohttp.ClientSession, config: str,
                         requests: list[Request], result: RunResult, slo_s: float,
                         duration_s: float, warmup_s: float = 0.0) -> None:  # fmt: skip
        cfg = epp_config(config, self.endpoints_file, kv_events_port=self.kv_events_port,
                         block_size=self.model.block_size)  # fmt: skip
        cfg_path = self.workdir / f"epp-{config}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
        pin = ["taskset", "-c", ",".join(map(str, sorted(self.epp_cpus)))] if self.epp_cpus else []
        epp = ManagedProcess(
            f"epp-{config}-{self.engines}",
            [*pin, sys.executable, "-m", "epp", f"--grpc-port={grpc_port}",
             f"--grpc-health-port={health_port}", f"--metrics-port={metrics_port}",
             "--bind-address=127.0.0.1", "--secure-serving=false",
             "--metrics-endpoint-auth=false", "--tracing=false", "--drain-timeout=0s",
             f"--refresh-metrics-interval={self.scrape_interval}",
             "--metrics-staleness-threshold=5s", f"--config-file={cfg_path}",
             "--v=4" if self.exact_decisions else "--v=1"],
            self.workdir,
        )  # fmt: skip
        envoy: EnvoyProcess | None = None
        await self.reset(session)
        try:
            await epp.start()
            assert epp.pid is not None
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            await wait_until(_http_ok(session, metrics_url), epp.name, 60, epp.check_alive)
            await _wait_epp_ready(health_port, epp)
            if config.startswith("precise"):
                await self._wait_events(session, metrics_url, epp)
            envoy = await _start_envoy(session, grpc_port, self.workdir)
            url = f"http://127.0.0.1:{envoy.port}/v1/completions"
            # The EPP has scraped every engine once and Envoy connected to it.
            await asyncio.sleep(1.0)
            await self.reset(session)
            pid = epp.pid
            start = _Start()

            async def snapshot() -> None:
                # Where the measured run starts: every figure is taken from here on.
                start.cpu_s = _proc_cpu_s(pid)
                async with session.get(metrics_url) as resp:
                    start.metrics = await resp.text()
                start.totals = (await self.fleet_stats(session))["totals"]
                epp.mark_log()

            # Without a warm-up the snapshot comes before the first request leaves.
            if warmup_s > 0:
                outcomes = await drive(url, requests, token_ids=self.token_ids,
                                       mark=(warmup_s, snapshot))  # fmt: skip
            else:
                await snapshot()
                outcomes = await drive(url, requests, token_ids=self.token_ids)
            if self.exact_decisions:
                _exact_decisions(result, epp.log_since_mark())
            cpu1 = _proc_cpu_s(pid)
            async with session.get(metrics_url) as resp:
                after = await resp.text()
            stats = await self.fleet_stats(session)
            outcomes = measured(requests, outcomes, warmup_s)
            summarise(result, outcomes, slo_s, duration_s, self.model.time_scale)
            cpu_s = cpu1 - start.cpu_s
            result.epp_cpu_ms_per_request = cpu_s * 1000 / max(1, len(outcomes))
            result.epp_peak_rss_mb = _proc_peak_rss_mb(pid)
            _decision_figures(result, start.metrics, after)
            totals = {k: v - start.totals.get(k, 0) for k, v in stats["totals"].items()}
            queried = totals["queried_tokens"]
            computed = totals["computed_prompt_tokens"]
            result.hit_rate = totals["hit_tokens"] / queried if queried else math.nan
            result.oracle_hit_rate = (
                totals["oracle_hit_tokens"] / computed if computed else math.nan
            )
            result.prefill_requests = int(totals.get("prefill_requests", 0))
            result.busy = pool_busy(totals["prompt_compute_ms"], self.engines, duration_s,
                                    self.model.time_scale)  # fmt: skip
            alarms = epp.log_alarms()
            if alarms:
                result.extra["epp_log_alarms"] = alarms[:5]
        finally:
            if envoy is not None:
                await envoy.stop()
            await epp.stop()

    async def _wait_events(self, session: aiohttp.ClientSession, metrics_url: str,
                           epp: ManagedProcess) -> None:  # fmt: skip
        """Until the EPP has heard every engine's KV events (a reset makes each publish)."""

        warm = {"model": MODEL, "prompt": " ".join(f"warm{i}" for i in range(40)),
                "max_tokens": 1}  # fmt: skip

        async def store(engine: dict[str, Any]) -> None:
            url = f"http://{engine['host']}:{engine['port']}/v1/completions"
            async with session.post(url, json=warm) as resp:
                await resp.read()

        async def heard() -> bool:
            # An engine is known once it has stored a block; the reset then empties it.
            await asyncio.gather(*(store(e) for e in self.manifest["engines"]))
            await self.reset(session)
            async with session.get(metrics_url) as resp:
                known = _gauge(await resp.text(), "disagg_epp_kv_events_engines")
            if known is not None and known >= self.engines:
                return True
            await asyncio.sleep(0.3)
            return False

        await wait_until(heard, "kv events from every engine", 90, epp.check_alive)


_ROUTED = re.compile(r"routed ([0-9.]+) ms after its stream opened")


def _exact_decisions(result: RunResult, epp_log: str) -> None:
    """Every decision's time, from the EPP's debug line for it (the observation its
    request-processing histogram takes, before bucketing)."""
    times = [float(m.group(1)) for m in _ROUTED.finditer(epp_log)]
    if times:
        result.extra["decision_exact_ms"] = {
            "n": len(times), "p50": percentile(times, 0.5), "p90": percentile(times, 0.9),
            "p99": percentile(times, 0.99), "max": max(times),
        }  # fmt: skip


def _decision_figures(result: RunResult, before: str, after: str) -> None:
    name = "llm_d_epp_request_processing_duration_seconds"
    b0, s0, c0 = _parse_histogram(before, name)
    b1, s1, c1 = _parse_histogram(after, name)
    prior = dict(b0)
    delta = [(le, n - prior.get(le, 0.0)) for le, n in b1]
    if c1 > c0:
        result.decision_mean_ms = (s1 - s0) / (c1 - c0) * 1000
        result.decision_p99_ms = histogram_quantile(delta, 0.99) * 1000
    name = "llm_d_epp_scheduler_e2e_duration_seconds"
    _, s0, c0 = _parse_histogram(before, name)
    _, s1, c1 = _parse_histogram(after, name)
    if c1 > c0:
        result.schedule_mean_ms = (s1 - s0) / (c1 - c0) * 1000


async def _start_envoy(session: aiohttp.ClientSession, grpc_port: int,
                       workdir: Path) -> EnvoyProcess:  # fmt: skip
    """Envoy in front of the EPP; another base id if one is taken (other Envoys run here)."""
    rng = random.Random()
    for attempt in range(4):
        envoy = EnvoyProcess(gateway_config(grpc_port), workdir, rng.randint(10_000, 60_000))
        await envoy.start()
        try:
            await envoy.wait_ready(session, 60)
        except RuntimeError:
            await envoy.stop()
            if attempt == 3:
                raise
            continue
        return envoy
    raise AssertionError("unreachable")


def _entry(name: str, host: str, port: int, role: str) -> dict[str, Any]:
    return {"name": name, "namespace": "default", "address": host, "port": str(port),
            "labels": {ROLE_LABEL: role}}  # fmt: skip


def _free_port_run(n: int) -> int:
    """The first of ``n`` consecutive ports that are free now."""
    import random
    import socket

    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no run of {n} free ports")


def _exists(path: Path) -> Any:
    async def check() -> bool:
        return path.exists()  # noqa: ASYNC240  (a stat, once per poll)

    return check


def _http_ok(session: aiohttp.ClientSession, url: str) -> Any:
    async def check() -> bool:
        async with session.get(url) as resp:
            return resp.status == 200

    return check


async def _wait_epp_ready(health_port: int, epp: ManagedProcess) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def ready() -> bool:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service="readiness"), timeout=1
                )
            except grpc.aio.AioRpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    await wait_until(ready, epp.name, 60, epp.check_alive)


# -- runs ----------------------------------------------------------------------------
async def compare(engines: int, workload: str, loads: list[float], configs: list[str],
                  duration_s: float, seed: int, slo_s: float, model: EngineModel,
                  workdir: Path, *, scale: float = 1.0, arrival: str = "poisson",
                  scrape_interval: str = "250ms", rate: float | None = None,
                  token_ids: bool = False, epp_cpus: frozenset[int] = frozenset(),
                  exact_decisions: bool = False, warmup_s: float = 0.0,
                  log: Any = print) -> list[RunResult]:  # fmt: skip
    """Every configuration at every load on one fleet (and one P/D fleet if asked).
    Traffic runs ``warmup_s`` before ``duration_s`` of it is measured."""
    if rate is None:
        mean_prompt = mean_prompt_tokens(workload, seed=seed, scale=scale)
        capacity = model.capacity(engines, mean_prompt)
        log(f"{engines} engines, {workload}: mean prompt {mean_prompt:.0f} tokens, "
            f"capacity {capacity:.1f} req/s")  # fmt: skip
    else:
        capacity = rate  # loads are then fractions of this rate
    results: list[RunResult] = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for pd in (False, True):
            names = [c for c in configs if c.startswith("pd") == pd]
            if not names:
                continue
            bench = Bench(engines, model, workdir, pd=pd, scrape_interval=scrape_interval,
                          token_ids=token_ids, epp_cpus=epp_cpus,
                          exact_decisions=exact_decisions)  # fmt: skip
            try:
                await bench.start(session)
                for load in loads:
                    rate = capacity * load
                    # Think times are model time: stretched with the model.
                    requests = generate(workload, rate=rate, duration_s=warmup_s + duration_s,
                                        seed=seed,
                                        arrival=arrival, scale=scale,
                                        think_s=4.0 / model.time_scale,
                                        step_s=1.0 / model.time_scale)  # fmt: skip
                    ideal = measured(requests, ideal_ttfts(requests, model), warmup_s)
                    for name in names:
                        result = RunResult(name, engines, workload, load, rate)
                        result.ideal_ttft_p99 = percentile(ideal, 0.99)
                        await bench.run_config(session, name, requests, result, slo_s,
                                               duration_s, warmup_s)  # fmt: skip
                        results.append(result)
                        log(_one_line(result))
            finally:
                await bench.stop()
    return results


def _one_line(r: RunResult) -> str:
    return (f"  {r.config:15} load {r.load:.2f} ({r.rate:.1f}/s) ok {r.ok}/{r.sent} "
            f"TTFT p50/p90/p99 {r.ttft_p50 * 1000:.0f}/{r.ttft_p90 * 1000:.0f}/"
            f"{r.ttft_p99 * 1000:.0f} ms (ideal {r.ideal_ttft_p99 * 1000:.0f}) ITL mean/p99 {r.itl_mean * 1000:.1f}/"
            f"{r.itl_p99 * 1000:.1f} ms "
            f"SLO {r.within_slo:.1%} hit {r.hit_rate:.1%} (oracle {r.oracle_hit_rate:.1%}) "
            f"busy {r.busy:.1%} "
            f"prefill {r.prefill_requests} EPP {r.epp_cpu_ms_per_request:.2f} ms CPU/req "
            f"decision {r.decision_mean_ms:.2f}/{r.decision_p99_ms:.1f} ms mean/p99 "
            f"RSS {r.epp_peak_rss_mb:.0f} MB lag p99 {r.send_lag_p99_ms:.0f} ms"
            + _exact_line(r))  # fmt: skip


def _exact_line(r: RunResult) -> str:
    exact = r.extra.get("decision_exact_ms")
    if not exact:
        return ""
    return (f" exact decision p50/p90/p99/max {exact['p50']:.1f}/{exact['p90']:.1f}/"
            f"{exact['p99']:.1f}/{exact['max']:.1f} ms ({exact['n']})")  # fmt: skip


def _targets(slo_s: float) -> list[float]:
    return sorted({*TTFT_TARGETS_S, slo_s})


def markdown_table(results: list[RunResult], slo_s: float) -> str:
    targets = " / ".join(f"{t:g}" for t in _targets(slo_s))
    head = (f"| config | engines | load | req/s | TTFT p50 (ms) | p90 | p99 | ideal p99 | "
            f"ITL mean / p99 (ms) | TTFT <= {targets} s | hit rate | oracle | pool busy | "
            f"to prefill | EPP CPU/req (ms) | decision mean/p99 (ms) | errors |")  # fmt: skip
    lines = [head, "|" + "---|" * 17]
    for r in results:
        lines.append(
            f"| {r.config} | {r.engines} | {r.load:.2f} | {r.rate:.1f} | {r.ttft_p50 * 1000:.0f} "
            f"| {r.ttft_p90 * 1000:.0f} | {r.ttft_p99 * 1000:.0f} "
            f"| {r.ideal_ttft_p99 * 1000:.0f} "
            f"| {r.itl_mean * 1000:.1f} / {r.itl_p99 * 1000:.1f} "
            f"| {' / '.join(f'{share:.1%}' for share in r.within.values())} "
            f"| {r.hit_rate:.1%} | {r.oracle_hit_rate:.1%} | {r.busy:.1%} | {r.prefill_requests} "
            f"| {r.epp_cpu_ms_per_request:.2f} "
            f"| {r.decision_mean_ms:.2f} / {r.decision_p99_ms:.1f} | {r.errors} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], path: Path, title: str) -> bool:
    """TTFT p99 against offered load, one line per configuration (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[benchmarks]'): no plot")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r.config for r in results):
        rows = sorted((r for r in results if r.config == name), key=lambda r: r.load)
        ax.plot([r.load * 100 for r in rows], [r.ttft_p99 for r in rows], marker="o", label=name)
    ax.set_xlabel("offered load (% of the pool's no-reuse prefill capacity)")
    ax.set_ylabel("TTFT p99 (s)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _write(results: list[RunResult], out: Path, stem: str, slo_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    (out / f"{stem}.md").write_text(markdown_table(results, slo_s))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=int, default=32)
    parser.add_argument("--workload", default="chat")
    parser.add_argument("--arrival", default="poisson")
    parser.add_argument("--load", type=float, default=0.8)
    parser.add_argument("--rate", type=float, default=None,
                        help="requests/s at load 1.0 instead of the pool's capacity")  # fmt: skip
    parser.add_argument("--sweep", default="", help="comma-separated loads (fractions)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of traffic measured per configuration and load")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=120.0,
                        help="seconds of the same traffic before the measured run, which "
                             "no figure counts: conversations reach their steady mix of "
                             "turns and the caches fill")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slo", type=float, default=0.5,
                        help="TTFT target in seconds (model time)")  # fmt: skip
    parser.add_argument("--scale", default="", help="engine counts, e.g. 8,32,128")
    parser.add_argument("--prompt-scale", type=float, default=1.0)
    parser.add_argument("--long-prompts", action="store_true",
                        help="96 engines, 240K-token prompts, precise prefix")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a one-minute run")
    parser.add_argument("--scrape-interval", default="250ms")
    parser.add_argument("--max-num-batched-tokens", type=int, default=0,
                        help="engines' step budget: decode steps slow down while a prompt "
                             "is computed on the same engine (0: they do not)")  # fmt: skip
    parser.add_argument("--epp-cpus", default="",
                        help="CPUs for the EPP alone, e.g. 0 (the rest of the stack runs on "
                             "the others), as when it has cores of its own")  # fmt: skip
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--plot", default="", help="PNG path for the load sweep")
    args = parser.parse_args(argv)
    try:
        epp_cpus = frozenset(int(c) for c in args.epp_cpus.split(",") if c)
    except ValueError:
        parser.error(f"--epp-cpus {args.epp_cpus}: expected CPU numbers, e.g. 0 or 0,1")
    if epp_cpus:
        others = os.sched_getaffinity(0) - epp_cpus
        if not others or not epp_cpus <= os.sched_getaffinity(0):
            parser.error(f"--epp-cpus {args.epp_cpus}: needs CPUs of this process's, not all")
        os.sched_setaffinity(0, others)  # the fleet, Envoy and the load follow
        print(f"EPP on CPUs {sorted(epp_cpus)}, the rest on {sorted(others)}")
    out = Path(args.out)
    workdir = Path(tempfile.mkdtemp(prefix="routing-bench-"))
    print(f"logs in {workdir}")
    if args.max_num_batched_tokens < 0:
        parser.error("--max-num-batched-tokens must be 0 or more")
    model = EngineModel(max_num_batched_tokens=args.max_num_batched_tokens)
    if args.smoke:
        results = asyncio.run(smoke(workdir))
        _write(results, out, "smoke", 1.0)
        print(markdown_table(results, 1.0))
        return 0 if all(r.ok > 0 and r.errors == 0 for r in results) else 1
    if args.long_prompts:
        results = asyncio.run(long_prompts(workdir, args.duration, epp_cpus))
        _write(results, out, "long-prompts", 600.0)
        print(markdown_table(results, 600.0))
        return 0
    configs = [c for c in args.configs.split(",") if c]
    loads = [float(x) for x in args.sweep.split(",") if x] or [args.load]
    sizes = [int(x) for x in args.scale.split(",") if x] or [args.engines]
    results = []
    for size in sizes:
        results += asyncio.run(compare(size, args.workload, loads, configs, args.duration,
                                       args.seed, args.slo, model, workdir,
                                       scale=args.prompt_scale, arrival=args.arrival,
                                       scrape_interval=args.scrape_interval,
                                       rate=args.rate, epp_cpus=epp_cpus,
                                       warmup_s=args.warmup))  # fmt: skip
    stem = f"{args.workload}-{'-'.join(map(str, sizes))}"
    _write(results, out, stem, args.slo)
    print(markdown_table(results, args.slo))
    if args.plot:
        plot(results, Path(args.plot), f"{args.workload}, {args.engines} engines")
    return 0


async def smoke(workdir: Path, log: Any = print) -> list[RunResult]:
    """Four engines with a step budget, short prompts, four configurations (two of them
    P/D): the whole path."""
    model = EngineModel(num_blocks=1024, prefill_ms_per_token=0.5, time_scale=1.0,
                        max_num_batched_tokens=256)  # fmt: skip
    configs = ["least-requests", "precise-prefix", "pd", "pd-backlog"]
    return await compare(4, "chat", [0.5], configs, 8.0,
                         seed=1, slo_s=1.0, model=model, workdir=workdir, scale=0.2,
                         exact_decisions=True, log=log)  # fmt: skip


async def long_prompts(workdir: Path, duration_s: float,
                       epp_cpus: frozenset[int] = frozenset()) -> list[RunResult]:  # fmt: skip
    """llm-d-router #2390's case: 96 endpoints, 240K-token prompts, precise prefix; every
    decision timed exactly (from the EPP's debug log)."""
    model = EngineModel(num_blocks=24_000, max_model_len=400_000, prefill_ms_per_token=0.01,
                        ttft_base_ms=20, max_num_seqs=8, time_scale=1.0)  # fmt: skip
    # docqa documents are 4-8K tokens: x40 makes 160K-320K-token prompts (mean ~240K).
    # Text prompts: the EPP has the engine tokenize them (/tokenize) before hashing; token
    # ids: the EPP hashes what the client sent.
    results: list[RunResult] = []
    for token_ids in (False, True):
        run = await compare(96, "docqa", [1.0], ["precise-prefix"], duration_s, seed=3,
                            slo_s=600.0, model=model, workdir=workdir, scale=40.0,
                            scrape_interval="1s", rate=1.0, token_ids=token_ids,
                            epp_cpus=epp_cpus, exact_decisions=True)  # fmt: skip
        for r in run:
            r.config += " (token ids)" if token_ids else " (text)"
        results += run
    return results


if __name__ == "__main__":
    raise SystemExit(main())
