"""Passthrough: other methods and paths, and P/D paths without the prefill header, reach
the local vLLM untouched and streamed both ways; routing headers never leave."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.sidecar.conftest import PD, StartSidecar, roles

ROUTING = {
    "x-prefiller-host-port": "10.9.9.9:1",
    "x-encoder-hosts-ports": "10.9.9.9:2",
    "x-gateway-destination-endpoint": "10.9.9.9:3",
    "x-kv-cache-source-host-port": "10.9.9.9:4",
    "x-data-parallel-host-port": "10.9.9.9:5",
    "x-data-parallel-rank": "1",
}


async def test_models_and_vllm_metrics_pass_through(pd: PD, client: aiohttp.ClientSession) -> None:
    async with client.get(pd.decode.url + "/v1/models") as direct:
        expected = await direct.json()
    async with client.get(pd.url + "/v1/models") as resp:
        assert resp.status == 200
        assert await resp.json() == expected
    async with client.get(pd.url + "/metrics") as resp:
        assert resp.status == 200
        assert "vllm:num_requests_running" in await resp.text()


@pytest.mark.parametrize("stream", [False, True])
async def test_pd_path_without_header_is_local_and_untouched(
    pd: PD, client: aiohttp.ClientSession, stream: bool
) -> None:
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hi there"}],
        "max_tokens": 3,
        "stream": stream,
    }
    async with client.post(pd.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        await resp.read()
    d_stats = await pd.decode.stats()
    assert roles(d_stats) == {"prefill": 0, "decode": 0, "aggregated": 1}
    assert d_stats["recorded"][0]["body"] == body
    assert (await pd.prefill.stats())["requests_total"] == 0
    assert (
        pd.sidecar.sample(
            "pd_sidecar_requests_total", path="/v1/chat/completions", mode="local", status="200"
        )
        == 1
    )


class Upstream:
    """A bare aiohttp server standing in for vLLM where the simulator has no such route."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.part_one = asyncio.Event()
        self.release_tail = asyncio.Event()

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": dict(request.headers),
                "body": body,
            }
        )
        return web.Response(
            status=207, body=body[::-1], headers={"X-Upstream": "yes", "Content-Type": "app/x"}
        )

    async def upload(self, request: web.Request) -> web.Response:
        received = b""
        while b"|" not in received:  # part one ends with '|'
            chunk = await request.content.readany()
            assert chunk
            received += chunk
        self.part_one.set()
        received += await request.content.read()
        return web.Response(body=str(len(received)).encode())

    async def download(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        await resp.write(b"first-part")
        await self.release_tail.wait()
        await resp.write(b"second-part")
        await resp.write_eof()
        return resp


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, int]]:
    state = Upstream()
    app = web.Application()
    app.router.add_route("*", "/upload", state.upload)
    app.router.add_get("/download", state.download)
    app.router.add_route("*", "/{tail:.*}", state.echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield state, int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def test_any_method_path_and_query_untouched(
    upstream: tuple[Upstream, int], start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    state, port = upstream
    sidecar = await start_sidecar(model_server_port=port)
    headers = {**ROUTING, "Authorization": "Bearer t", "X-Other": "1", "Connection": "X-Other"}
    async with client.put(
        sidecar.url + "/some/where?q=1&q=2&x=%20", data=b"abc\x00def", headers=headers
    ) as resp:
        assert resp.status == 207
        assert await resp.read() == b"fed\x00cba"
        assert resp.headers["X-Upstream"] == "yes"
        assert resp.headers["Content-Type"] == "app/x"
    (seen,) = state.seen
    assert seen["method"] == "PUT"
    assert seen["path_qs"] == "/some/where?q=1&q=2&x=%20"
    assert seen["body"] == b"abc\x00def"
    sent = {k.lower() for k in seen["headers"]}
    assert not sent & set(ROUTING)
    assert "x-other" not in sent  # named by Connection: hop-by-hop
    assert seen["headers"]["Authorization"] == "Bearer t"


async def test_generation_path_without_header_refuses_a_body_it_cannot_check(
    upstream: tuple[Upstream, int], start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    # Decode-only bodies are checked for sidecar-only fields like P/D ones: a body the
    # sidecar cannot parse cannot be checked, so it never reaches the engine.
    state, port = upstream
    sidecar = await start_sidecar(model_server_port=port)
    async with client.post(sidecar.url + "/v1/completions", data=b"not json") as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert "not valid JSON" in error["message"]
    assert state.seen == []


async def test_request_body_streams_upstream_before_it_is_complete(
    upstream: tuple[Upstream, int], start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    state, port = upstream
    sidecar = await start_sidecar(model_server_port=port)

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 100_000 + b"|"
        # The upstream must have part one before the client sends the rest.
        await asyncio.wait_for(state.part_one.wait(), 10)
        yield b"y" * 100_000

    async with client.post(sidecar.url + "/upload", data=body()) as resp:
        assert resp.status == 200
        assert await resp.read() == b"200001"


async def test_response_streams_back_before_it_is_complete(
    upstream: tuple[Upstream, int], start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    state, port = upstream
    sidecar = await start_sidecar(model_server_port=port)
    async with client.get(sidecar.url + "/download") as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readexactly(len(b"first-part")), 10)
        assert first == b"first-part"
        state.release_tail.set()
        assert await resp.content.read() == b"second-part"
