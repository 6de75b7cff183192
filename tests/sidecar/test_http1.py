"""The engine legs' HTTP/1.1 client against real servers on 127.0.0.1: framing both ways,
keep-alive reuse, limits, decoding, and the aiohttp exceptions its callers translate."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.http1 import Http1Client

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def client(**overrides: object) -> Http1Client:
    options: dict[str, object] = {
        "limit": 64,
        "keepalive_timeout": 4.0,
        "connect_timeout": 2.0,
        "decompress": False,
    } | overrides
    return Http1Client(**options)  # type: ignore[arg-type]


async def test_bytes_body_and_content_length_answer(serve: Callable[..., Awaitable[str]]) -> None:
    seen: list[tuple[str, str, bytes, str | None, str | None]] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append(
            (request.method, request.path_qs, body, request.headers.get("x-a"), request.host)
        )
        return web.json_response({"got": len(body)}, headers={"x-b": "2"})

    base = await serve(echo)
    http = client()
    try:
        response = await http.request("POST", base + "/v1/x?q=1", CIMultiDict({"x-a": "1"}), b"ab")
        assert (response.status, response.reason) == (200, "OK")
        assert response.content_type == "application/json"
        assert response.headers["x-b"] == "2"
        assert await response.read() == b'{"got": 2}'
        response.release()
    finally:
        await http.close()
    assert seen == [("POST", "/v1/x?q=1", b"ab", "1", base.removeprefix("http://"))]


async def test_streamed_body_goes_chunked_and_chunked_answers_stream(
    serve: Callable[..., Awaitable[str]],
) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        out.enable_chunked_encoding()
        await out.prepare(request)
        for part in (b"data: 1\n\n", b"data: " + body + b"\n\n"):
            await out.write(part)
        await out.write_eof()
        return out

    async def parts() -> AsyncIterator[bytes]:
        yield b"he"
        yield b"llo"

    base = await serve(stream)
    http = client()
    try:
        response = await http.request("POST", base + "/s", CIMultiDict(), parts())
        assert response.content_type == "text/event-stream"
        assert response.content_length is None
        assert await response.read() == b"data: 1\n\ndata: hello\n\n"
        response.release()
    finally:
        await http.close()


async def test_connections_are_reused_and_bounded_per_host(
    serve: Callable[..., Awaitable[str]],
) -> None:
    peers: set[object] = set()
    active = 0
    most = 0

    async def slow(request: web.Request) -> web.StreamResponse:
        nonlocal active, most
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        active += 1
        most = max(most, active)
        await asyncio.sleep(0.02)
        active -= 1
        return web.Response(text="ok")

    base = await serve(slow)
    http = client(limit_per_host=2)

    async def one() -> bytes:
        response = await http.request("GET", base + "/", CIMultiDict(), None)
        try:
            return await response.read()
        finally:
            response.release()

    try:
        answers = await asyncio.gather(*(one() for _ in range(8)))
    finally:
        await http.close()
    assert answers == [b"ok"] * 8
    assert most == 2
    assert len(peers) == 2  # two connections, each used four times


async def test_gzip_answers_are_decoded_when_asked(serve: Callable[..., Awaitable[str]]) -> None:
    async def zipped(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=gzip.compress(b'{"a":1}', mtime=0),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    base = await serve(zipped)
    for decompress, expected in ((True, b'{"a":1}'), (False, gzip.compress(b'{"a":1}', mtime=0))):
        http = client(decompress=decompress)
        try:
            response = await http.request("POST", base + "/", CIMultiDict(), b"{}")
            body = await response.read()
            response.release()
        finally:
            await http.close()
        assert body == expected


async def test_refused_connection_is_a_connector_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    http = client()
    try:
        with pytest.raises(aiohttp.ClientConnectorError) as raised:
            await http.request("POST", f"http://127.0.0.1:{port}/", CIMultiDict(), b"")
    finally:
        await http.close()
    assert str(port) in str(raised.value)


async def test_a_body_cut_short_is_a_payload_error(serve: Callable[..., Awaitable[str]]) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Length": "100"})
        await out.prepare(request)
        await out.write(b"only this")
        assert request.transport is not None
        request.transport.close()
        return out

    base = await serve(cut)
    http = client()
    try:
        response = await http.request("GET", base + "/", CIMultiDict(), None)
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
        response.close()
    finally:
        await http.close()


async def test_closed_before_answering_is_server_disconnected() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = client()
    try:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await http.request("GET", f"http://127.0.0.1:{port}/", CIMultiDict(), None)
    finally:
        await http.close()
        server.close()
        await server.wait_closed()


async def test_cancelling_a_request_closes_its_connection() -> None:
    closed = asyncio.Event()
    arrived = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        await reader.read()  # until the client closes
        closed.set()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = client()
    try:
        task = asyncio.ensure_future(
            http.request("GET", f"http://127.0.0.1:{port}/", CIMultiDict(), None)
        )
        await asyncio.wait_for(arrived.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 10)
    finally:
        await http.close()
        server.close()
        await server.wait_closed()


async def test_the_reason_phrase_is_the_servers(serve: Callable[..., Awaitable[str]]) -> None:
    async def teapot(request: web.Request) -> web.StreamResponse:
        return web.Response(status=418, reason="Short And Stout", text="no")

    base = await serve(teapot)
    http = client()
    try:
        response = await http.request("GET", base + "/", CIMultiDict(), None)
        assert (response.status, response.reason) == (418, "Short And Stout")
        assert await response.read() == b"no"
        response.release()
    finally:
        await http.close()


async def test_a_freed_host_is_not_kept_waiting_behind_a_busy_one(
    serve: Callable[..., Awaitable[str]],
) -> None:
    """Per-host limit 1, hosts A and B both busy, a request for A queued before one for
    B: when B's connection is given back, the request for B goes, not stays asleep
    because the turn went to A's (still full)."""
    release_a = asyncio.Event()
    release_b = asyncio.Event()
    arrived: dict[str, asyncio.Event] = {"a": asyncio.Event(), "b": asyncio.Event()}

    def held(name: str, gate: asyncio.Event) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            arrived[name].set()
            await gate.wait()
            return web.Response(text=name)

        return handler

    base_a = await serve(held("a", release_a))
    base_b = await serve(held("b", release_b))
    http = client(limit_per_host=1)

    async def get(base: str) -> bytes:
        response = await http.request("GET", base + "/", CIMultiDict(), None)
        try:
            return await response.read()
        finally:
            response.release()

    try:
        first_a = asyncio.create_task(get(base_a))
        first_b = asyncio.create_task(get(base_b))
        await arrived["a"].wait()
        await arrived["b"].wait()
        second_a = asyncio.create_task(get(base_a))  # waits: A is at its limit
        await asyncio.sleep(0)
        second_b = asyncio.create_task(get(base_b))  # waits behind it: B too
        await asyncio.sleep(0)
        release_b.set()  # B's first answer ends: its slot frees
        assert await first_b == b"b"
        assert await asyncio.wait_for(second_b, 10) == b"b"  # not stuck behind A's waiter
        assert not second_a.done()
        release_a.set()
        assert await first_a == b"a" and await second_a == b"a"
    finally:
        release_a.set()
        release_b.set()
        await http.close()
