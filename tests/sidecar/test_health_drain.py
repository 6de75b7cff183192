"""Liveness, readiness and graceful drain (in process)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.health import Readiness
from tests.sidecar.conftest import StartSidecar


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_health_and_ready(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    decode = await start_sim(role="decode", zero_latency=True)
    up = await start_sidecar(model_server_port=decode.port)
    down = await start_sidecar(model_server_port=_closed_port())
    for sidecar, ready in ((up, 200), (down, 503)):
        async with client.get(sidecar.url + "/health") as resp:
            assert resp.status == 200
        async with client.get(sidecar.url + "/ready") as resp:
            assert resp.status == ready


@pytest.fixture
async def health_server() -> AsyncIterator[tuple[list[int], str]]:
    hits: list[int] = []
    status = [200]

    async def health(request: web.Request) -> web.Response:
        hits.append(1)
        return web.Response(status=status[0])

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield hits, f"http://127.0.0.1:{runner.addresses[0][1]}/health"
    finally:
        await runner.cleanup()


async def test_readiness_is_cached_and_shared(health_server: tuple[list[int], str]) -> None:
    hits, url = health_server
    async with aiohttp.ClientSession() as session:
        cached = Readiness(session, url, ttl=60.0, timeout=5.0)
        results = await asyncio.gather(*(cached.ready() for _ in range(20)))
        assert all(results)
        assert await cached.ready()
        assert len(hits) == 1  # one probe for concurrent callers, then the cache
        fresh = Readiness(session, url, ttl=0.0, timeout=5.0)
        await fresh.ready()
        await fresh.ready()
        assert len(hits) == 3
        fresh.draining = True
        assert not await fresh.ready()
        await cached.close()
        await fresh.close()


async def test_drain_lets_in_flight_streams_finish(
    start_sim: Any, start_sidecar: StartSidecar
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", itl_ms=20.0, ttft_base_ms=0.0)
    sidecar = await start_sidecar(model_server_port=decode.port, drain_timeout=10.0)
    body = {"model": "sim-model", "prompt": "hi " * 10, "max_tokens": 25, "stream": True}
    headers = {"x-prefiller-host-port": prefill.host_port}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(sidecar.url + "/v1/completions", json=body, headers=headers)
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        drain = asyncio.ensure_future(sidecar.servers.drain_and_stop())
        rest = await resp.content.read()
        await drain
        assert rest.endswith(b"data: [DONE]\n\n")
        assert rest.count(b'"choices"') >= 24
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(sidecar.url + "/health"):
                pass
