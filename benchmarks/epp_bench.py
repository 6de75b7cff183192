"""Decision latency of the EPP, against a do-nothing ext_proc server on the same stack.

For 8, 64 and 256 endpoints and 4 KB and 200 KB prompts it measures, per request:

* in-process: one ext_proc stream over loopback gRPC, driven like Envoy drives it
  (headers, then the body in 16 KB chunks, full-duplex). ``decide`` is the time from
  sending the last body chunk to receiving the routing answer; ``body`` to receiving
  the last re-emitted body chunk (what the gateway waits for before the upstream has
  the whole request).
* through Envoy: an HTTP POST through the real Envoy (ext_proc filter, ORIGINAL_DST
  routing) to in-process backends, end to end.

The real EPP runs the Director with a P/D EndpointPickerConfig (prefix-cache, queue and
KV scorers, prefix-based P/D decider) over file-discovered endpoints whose /metrics are
scraped (once, at start, by default: see --refresh-metrics-interval). The baseline is the same ExtProcService with a DecisionMaker that returns a
fixed decision without reading the body: the difference is what scheduling adds.

Run from the repository root:  .venv/bin/python -m benchmarks.epp_bench [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml
from aiohttp import web

from epp._proto.disagg_extproc_pb2 import (
    HeaderMap,
    HeaderValue,
    HttpBody,
    HttpHeaders,
    ProcessingMode,
    ProcessingRequest,
    ProcessingResponse,
    ProtocolConfiguration,
)
from epp.decision import Decision
from epp.director import Director, DirectorSettings, build_director
from epp.extproc import EXTPROC_METHOD, ExtProcConfig, ExtProcService
from epp.metrics import EppMetrics

ENDPOINT_COUNTS = (8, 64, 256)
PROMPT_SIZES = {"4KB": 4 * 1024, "200KB": 200 * 1024}
CHUNK = 16 * 1024
RESULTS = Path(__file__).parent / "results"

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: file-discovery
  parameters: {{path: '{path}'}}
- type: decode-filter
- type: prefill-filter
- type: prefix-cache-scorer
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {{nonCachedTokens: 256}}
- type: disagg-profile-handler
  parameters:
    deciders: {{prefill: prefix-based-pd-decider}}
schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: queue-scorer
"""


class FixedDecision:
    """The do-nothing scheduler: one fixed decode endpoint, body unread."""

    def __init__(self, decode: str) -> None:
        self.decode = decode

    def is_ready(self) -> bool:
        return True

    async def decide(
        self,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        subset: Sequence[str] | None,
        *,
        headers_only: bool = False,
    ) -> Decision:
        return Decision(decode=self.decode)


class Pods:
    """N engine stand-ins on loopback: /metrics of an idle vLLM, any POST answered small."""

    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.ports: list[int] = []

    async def start(self, count: int) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        metrics = (
            "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n"
            "vllm:kv_cache_usage_perc 0.1\n"
        )

        async def get_metrics(_: web.Request) -> web.Response:
            return web.Response(text=metrics)

        async def post(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response({"ok": True})

        app.router.add_get("/metrics", get_metrics)
        app.router.add_post("/{tail:.*}", post)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        for _ in range(count):
            await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.ports = [int(a[1]) for a in self.runner.addresses]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def write_endpoints(self, path: Path, count: int) -> None:
        entries = [
            {
                "name": f"pod-{i}",
                "namespace": "default",
                "address": "127.0.0.1",
                "port": str(port),
                # one in four is a prefill pod
                "labels": {"llm-d.ai/role": "prefill" if i % 4 == 0 else "decode"},
            }
            for i, port in enumerate(self.ports[:count])
        ]
        path.write_text(yaml.safe_dump({"endpoints": entries}))


_TEXT_CACHE: dict[int, str] = {}


def _random_text(rng: random.Random, size: int) -> str:
    words, length = [], 0
    while length < size:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


def make_body(size: int, rng: random.Random) -> bytes:
    """A /v1/completions body of about ``size`` bytes whose prompt is new from its start.

    A unique head makes every prefix-hash block unseen (the hashes chain), so each
    request costs the scheduler a full cold prompt; the tail comes from a pre-made text.
    """
    pool = _TEXT_CACHE.get(size)
    if pool is None:
        pool = _TEXT_CACHE[size] = _random_text(rng, 2 * size)
    head = _random_text(rng, 64)
    start = rng.randrange(0, len(pool) - size)
    prompt = head + " " + pool[start : start + size - len(head)]
    return json.dumps({"model": "m", "prompt": prompt, "max_tokens": 1}).encode()


def _headers(path: str) -> ProcessingRequest:
    pairs = [(":method", "POST"), (":path", path), (":authority", "gw"),
             ("content-type", "application/json")]  # fmt: skip
    return ProcessingRequest(
        request_headers=HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])
        ),
        protocol_config=ProtocolConfiguration(
            request_body_mode=ProcessingMode.FULL_DUPLEX_STREAMED,
            response_body_mode=ProcessingMode.FULL_DUPLEX_STREAMED,
        ),
    )


async def one_stream(channel: grpc.aio.Channel, body: bytes) -> tuple[float, float]:
    """(decide, body) seconds for one request over an ext_proc stream."""
    call = channel.stream_stream(
        EXTPROC_METHOD,
        request_serializer=ProcessingRequest.SerializeToString,
        response_deserializer=ProcessingResponse.FromString,
    )()
    await call.write(_headers("/v1/completions"))
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    for chunk in chunks[:-1]:
        await call.write(ProcessingRequest(request_body=HttpBody(body=chunk)))
    t0 = time.perf_counter()
    await call.write(ProcessingRequest(request_body=HttpBody(body=chunks[-1], end_of_stream=True)))
    first = await call.read()
    assert isinstance(first, ProcessingResponse)
    if first.WhichOneof("response") != "request_headers":
        raise RuntimeError(f"EPP refused the request: {first}")
    t_decide = time.perf_counter() - t0
    while True:
        msg = await call.read()
        assert isinstance(msg, ProcessingResponse)
        if msg.request_body.response.body_mutation.streamed_response.end_of_stream:
            break
    t_body = time.perf_counter() - t0
    # Finish the exchange the way Envoy does, so in-flight counts are released.
    await call.write(
        ProcessingRequest(response_headers=HttpHeaders(headers=HeaderMap(), end_of_stream=True))
    )
    await call.read()
    await call.done_writing()
    await call.read()
    return t_decide, t_body


async def one_http(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"gateway answered {r.status}")
    return time.perf_counter() - t0


@dataclass
class Series:
    label: str
    values: list[float]

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.values)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        return {
            "p50_ms": statistics.median(ordered) * 1e3,
            "p99_ms": p99 * 1e3,
            "n": float(len(ordered)),
        }


async def start_extproc(decision_maker: Any, metrics: EppMetrics) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    ExtProcService(decision_maker, metrics, ExtProcConfig()).register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def bench(
    requests: int, envoy_requests: int, use_envoy: bool, refresh_s: float = 3600.0
) -> list[dict[str, Any]]:
    pods = Pods()
    await pods.start(max(ENDPOINT_COUNTS))
    rng = random.Random(7)
    rows: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="epp-bench-"))
    baseline_server, baseline_port = await start_extproc(
        FixedDecision(f"127.0.0.1:{pods.ports[1]}"), EppMetrics()
    )
    try:
        for count in ENDPOINT_COUNTS:
            endpoints = workdir / f"endpoints-{count}.yaml"
            pods.write_endpoints(endpoints, count)
            director: Director = await build_director(
                DirectorSettings(
                    config_text=CONFIG.format(path=endpoints),
                    refresh_metrics_interval_s=refresh_s,
                    metrics_staleness_threshold_s=max(5.0, 10 * refresh_s),
                ),
                EppMetrics(),
            )
            await director.start()
            server, port = await start_extproc(director, director.metrics)
            gateways = []
            try:
                if use_envoy:
                    gateways = await _start_envoys(workdir / f"envoy-{count}", port, baseline_port)
                for size_name, size in PROMPT_SIZES.items():
                    rows.extend(
                        await _measure(
                            count, size_name, size, rng, port, baseline_port, requests,
                            gateways, envoy_requests,
                        )
                    )  # fmt: skip
            finally:
                for gateway in gateways:
                    await gateway.stop()
                await server.stop(grace=None)
                await director.stop()
    finally:
        await baseline_server.stop(grace=None)
        await pods.stop()
    return rows


async def _start_envoys(workdir: Path, epp_port: int, baseline_port: int) -> list[Any]:
    # The harness is shared with the real-Envoy tests.
    from tests.epp_gateway.envoy_gateway import EnvoyGateway, gateway_config

    gateways = [
        EnvoyGateway(gateway_config(epp_port), workdir / "epp"),
        EnvoyGateway(gateway_config(baseline_port), workdir / "baseline"),
    ]
    for gateway in gateways:
        await gateway.start()
    return gateways


async def _measure(
    count: int,
    size_name: str,
    size: int,
    rng: random.Random,
    port: int,
    baseline_port: int,
    requests: int,
    gateways: list[Any],
    envoy_requests: int,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    warmup = 10
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as epp,
        grpc.aio.insecure_channel(f"127.0.0.1:{baseline_port}") as baseline,
    ):
        results: dict[str, tuple[list[float], list[float]]] = {"epp": ([], []), "noop": ([], [])}
        # Interleaved, so background noise hits both alike.
        for i in range(warmup + requests):
            body = make_body(size, rng)
            for name, channel in (("epp", epp), ("noop", baseline)):
                decide, whole = await one_stream(channel, body)
                if i >= warmup:
                    results[name][0].append(decide)
                    results[name][1].append(whole)
        for name, (decide_s, body_s) in results.items():
            rows.append({"endpoints": count, "prompt": size_name, "path": "in-process",
                         "server": name, "decide": Series("decide", decide_s).summary(),
                         "body": Series("body", body_s).summary()})  # fmt: skip
    if gateways:
        timings: dict[str, list[float]] = {"epp": [], "noop": []}
        async with aiohttp.ClientSession() as session:
            for i in range(warmup + envoy_requests):
                body = make_body(size, rng)
                for name, gateway in zip(("epp", "noop"), gateways, strict=True):
                    t = await one_http(session, f"{gateway.url}/v1/completions", body)
                    if i >= warmup:
                        timings[name].append(t)
        for name, values in timings.items():
            rows.append({"endpoints": count, "prompt": size_name, "path": "envoy",
                         "server": name, "http": Series("http", values).summary()})  # fmt: skip
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: EPP vs do-nothing, and what the EPP adds at p50."""
    lines = [
        "| endpoints | prompt | path | metric | EPP p50 / p99 (ms) | do-nothing p50 / p99 (ms) "
        "| added at p50 (ms) |",
        "|---:|---:|---|---|---:|---:|---:|",
    ]
    keyed = {(r["endpoints"], r["prompt"], r["path"], r["server"]): r for r in rows}
    for count in ENDPOINT_COUNTS:
        for prompt in PROMPT_SIZES:
            for path, metrics in (("in-process", ("decide", "body")), ("envoy", ("http",))):
                epp = keyed.get((count, prompt, path, "epp"))
                noop = keyed.get((count, prompt, path, "noop"))
                if epp is None or noop is None:
                    continue
                for metric in metrics:
                    a, b = epp[metric], noop[metric]
                    lines.append(
                        f"| {count} | {prompt} | {path} | {metric} "
                        f"| {a['p50_ms']:.3f} / {a['p99_ms']:.3f} "
                        f"| {b['p50_ms']:.3f} / {b['p99_ms']:.3f} "
                        f"| {a['p50_ms'] - b['p50_ms']:+.3f} |"
                    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=200, help="in-process requests per cell")
    parser.add_argument("--envoy-requests", type=int, default=100,
                        help="HTTP requests through Envoy per cell")  # fmt: skip
    parser.add_argument("--no-envoy", action="store_true", help="skip the real-Envoy path")
    parser.add_argument(
        "--refresh-metrics-interval",
        type=float,
        default=3600.0,
        help="seconds between /metrics scrapes of each endpoint. The default scrapes once at"
        " start, so the figures are the decision alone: at 256 endpoints even a 1 s"
        " refresh saturates the event loop (the shared httpx pool scans every connection"
        " per request)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    rows = asyncio.run(
        bench(args.requests, args.envoy_requests, not args.no_envoy, args.refresh_metrics_interval)
    )
    table = render(rows)
    print(table)
    print(f"\n({time.perf_counter() - started:.0f} s; python {sys.version.split()[0]})")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"epp_bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"raw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
