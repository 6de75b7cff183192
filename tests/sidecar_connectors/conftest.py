"""Fixtures for the connector and encode-stage tests: the sidecar fixtures, plus helpers."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.sidecar.conftest import client, start_sidecar

__all__ = ["CountingProxy", "client", "sse_events", "start_sidecar"]


class CountingProxy:
    """A loopback HTTP forwarder in front of one server that counts requests per path."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.calls: Counter[str] = Counter()
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> CountingProxy:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = int(self.runner.addresses[0][1])
        return self

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        self.calls[request.path] += 1
        body = await request.read()
        async with self._session.request(
            request.method, self.target + request.path_qs, data=body,
            headers={"Content-Type": request.content_type},
        ) as resp:  # fmt: skip
            return web.Response(
                status=resp.status, body=await resp.read(), content_type=resp.content_type
            )

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self._session is not None:
            await self._session.close()


@pytest.fixture
async def counting_proxy() -> AsyncIterator[Callable[[str], Awaitable[CountingProxy]]]:
    started: list[CountingProxy] = []

    async def start(target: str) -> CountingProxy:
        proxy = await CountingProxy(target).start()
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            await proxy.stop()


def sse_events(text: str) -> list[Any]:
    """The JSON payloads of an SSE body's ``data:`` lines ([DONE] as the string)."""
    import json

    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
