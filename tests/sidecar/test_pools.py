"""Connection pools: a pooled connection the server already closed is resent once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.sidecar.conftest import StartSidecar


class ClosingServer:
    """HTTP/1.1 server that answers the first request on each connection with keep-alive,
    then closes the connection when a second request arrives on it (the race a client
    loses when it reuses a connection the server just timed out)."""

    def __init__(self) -> None:
        self.connections = 0
        self.answered = 0
        self.dropped = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            served = 0
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if served == 1:
                    self.dropped += 1
                    return
                body = b'{"ok": true}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
                self.answered += 1
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def closing_server() -> AsyncIterator[tuple[ClosingServer, int]]:
    state = ClosingServer()
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    try:
        yield state, int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def test_stale_pooled_connection_is_resent_once(
    closing_server: tuple[ClosingServer, int],
    start_sidecar: StartSidecar,
    start_sim: Any,
    client: aiohttp.ClientSession,
) -> None:
    state, port = closing_server
    prefill = await start_sim(role="prefill", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=port)
    body = {"model": "sim-model", "prompt": "hello", "max_tokens": 2}
    headers = {"x-prefiller-host-port": prefill.host_port}
    for _ in range(3):  # POST decode legs: resent by the sidecar's own rule
        async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
            assert r.status == 200
            assert await r.json() == {"ok": True}
    assert state.answered == 3
    assert state.dropped == 2
    assert sidecar.sample("pd_sidecar_stale_connection_retries_total", stage="decode") == 2
    for _ in range(2):  # idempotent passthrough requests are covered as well
        async with client.get(sidecar.url + "/v1/models") as resp:
            assert resp.status == 200
    assert state.answered == 5


async def test_pool_settings() -> None:
    from sidecar.upstream import make_session

    session = make_session(limit=512, keepalive_timeout=4.0, connect_timeout=1.0, decompress=False)
    try:
        connector = session.connector
        assert isinstance(connector, aiohttp.TCPConnector)
        assert connector.limit == 512
        assert connector.limit_per_host == 0
        assert connector._keepalive_timeout == 4.0  # below vLLM's 5 s
    finally:
        await session.close()
