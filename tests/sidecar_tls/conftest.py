"""TLS fixtures: the sidecar fixtures, and a TLS front for a simulated engine."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from tests.sidecar.conftest import client, start_sidecar

__all__ = ["TlsFront", "client", "start_sidecar", "tls_front"]

_HOP = {"content-length", "transfer-encoding", "connection", "content-encoding"}


@dataclass
class TlsFront:
    """An HTTPS server on loopback that forwards to a (plain http) simulated engine."""

    port: int
    handshakes_failed: int = 0

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"


StartFront = Callable[[str, ssl.SSLContext], Awaitable[TlsFront]]


@pytest.fixture
async def tls_front() -> AsyncIterator[StartFront]:
    runners: list[web.AppRunner] = []
    session = aiohttp.ClientSession(auto_decompress=False)

    async def start(upstream: str, context: ssl.SSLContext) -> TlsFront:
        async def forward(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP | {"host"}}
            async with session.request(
                request.method, upstream + request.raw_path, data=body or None, headers=headers
            ) as resp:
                out = web.StreamResponse(
                    status=resp.status,
                    headers={k: v for k, v in resp.headers.items() if k.lower() not in _HOP},
                )
                await out.prepare(request)
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        return TlsFront(int(runner.addresses[0][1]))

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()
        await session.close()
