"""A client that leaves while the sidecar writes to it is a 499, not a server error.

The window: the local engine's first bytes arrive in the same event-loop turn as the
client's FIN. The handler resumes first and writes its response headers to a transport
that is already closing, before aiohttp's connection_lost cancels it: a
``ConnectionResetError`` from inside the handler, which aiohttp would log as
"Error handling request" with a traceback. Raw sockets on both sides put the two
events in one turn deterministically: the engine's bytes are sent first, then the
client's FIN, with no await in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import eventually
from tests.sidecar.conftest import StartSidecar

BODY = json.dumps({"model": "sim-model", "prompt": "hello " * 30, "max_tokens": 4}).encode()
FIRST_BYTES = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'1c\r\ndata: {"choices": [{}]}\r\n\r\n\r\n'
)


@dataclass
class HeldEngine:
    """A stand-in local engine that answers only when told, on a raw socket."""

    server: asyncio.Server
    requests: asyncio.Queue[asyncio.StreamWriter] = field(default_factory=asyncio.Queue)

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def held_engine() -> AsyncIterator[HeldEngine]:
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode().split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                if b" /health " in head.split(b"\r\n", 1)[0]:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    continue
                await engine.requests.put(writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    engine = HeldEngine(server)
    try:
        yield engine
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


def _send_request(port: int, headers: dict[str, str]) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port))
    lines = [
        "POST /v1/completions HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(BODY)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    client.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + BODY)
    return client


@pytest.mark.parametrize("mode", ["local", "pd"])
async def test_client_leaving_as_the_first_bytes_arrive_is_a_quiet_499(
    start_sim: Any,
    start_sidecar: StartSidecar,
    held_engine: HeldEngine,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    sidecar = await start_sidecar(model_server_port=held_engine.port)
    headers: dict[str, str] = {}
    if mode == "pd":
        prefill = await start_sim(role="prefill", zero_latency=True)
        headers["x-prefiller-host-port"] = prefill.host_port
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    client = _send_request(sidecar.servers.port, headers)
    try:
        engine_side = await asyncio.wait_for(held_engine.requests.get(), 10)
        # One turn, no await: the engine's first bytes, then the client's FIN.
        engine_side.write(FIRST_BYTES)
        client.shutdown(socket.SHUT_WR)
    finally:
        client.close()

    def answered() -> float:
        return sidecar.sample(
            "pd_sidecar_requests_total", path="/v1/completions", mode=mode, status="499"
        )

    async def counted() -> bool:
        return answered() == 1 and sidecar.sample("pd_sidecar_in_flight_requests") == 0

    await eventually(counted, what="the request to be counted as 499")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
