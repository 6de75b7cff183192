"""The sidecar's HTTP/1.1 server (``sidecar.server``) on loopback, spoken to with raw
sockets: framing, keep-alive, pipelining, bounds, refusals and shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from sidecar.log import http_log
from sidecar.server import (
    BODY_HIGH_WATER,
    LINGER_S,
    MAX_HEAD,
    MAX_HEADERS,
    MAX_LINE,
    Request,
    RequestKey,
    Response,
    Server,
    StreamResponse,
    json_response,
)

SEEN = RequestKey("seen", list)


@dataclass
class Running:
    server: Server
    port: int
    seen: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def ask(self, raw: bytes) -> tuple[bytes, dict[str, str], bytes]:
        """``raw`` sent on a connection of its own: the answer."""
        reader, writer = await self.connect()
        try:
            writer.write(raw)
            return await _read_answer(reader)
        finally:
            writer.close()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """One answer: status line, headers (lower-cased names), body (Content-Length or
    chunked)."""
    status = (await reader.readline()).rstrip()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        body = await reader.read()
    return status, headers, body


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    holder: list[Running] = []

    async def handler(request: Request) -> StreamResponse:
        state = holder[0]
        if request.path == "/sink":
            # Reads only once released, then as it comes: the first read is what was
            # buffered meanwhile.
            await state.release.wait()
            first, size = b"", 0
            async for chunk in request.content.iter_any():
                first = first or chunk
                size += len(chunk)
            return json_response({"size": size, "first": len(first)})
        if request.path == "/early":
            # Answered on the declared length, the body unread.
            state.seen.append((request.method, request.path, request.raw_path, b""))
            return json_response({"refused": True}, status=413)
        body = await request.content.read()
        state.seen.append((request.method, request.path, request.raw_path, body))
        if request.path == "/stream":
            out = StreamResponse(headers={"Content-Type": "text/plain"})
            await out.prepare(request)
            for piece in (b"one ", b"two ", b"three"):
                await out.write(piece)
            await out.write_eof()
            return out
        if request.path == "/slow":
            state.started.set()
            try:
                await state.release.wait()
            except asyncio.CancelledError:
                state.cancelled.set()
                raise
            return Response(body=b"done")
        if request.path == "/split":
            return Response(body=b"x", headers={"X-Bad": "a\r\nInjected: yes"})
        if request.path == "/boom":
            raise RuntimeError("a bug")
        return json_response({"path": request.path, "size": len(body)})

    server = Server(handler, web.Application(), keepalive_timeout=30.0, log=http_log)
    port = await server.listen("127.0.0.1", 0)
    holder.append(Running(server, port))
    try:
        yield holder[0]
    finally:
        holder[0].release.set()
        await server.shutdown(2.0)


async def test_keep_alive_carries_requests_one_after_another(running: Running) -> None:
    reader, writer = await running.connect()
    try:
        for index in range(3):
            body = b"x" * index
            writer.write(
                b"POST /a/%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                % (index, len(body), body)
            )
            status, headers, answer = await _read_answer(reader)
            assert status == b"HTTP/1.1 200 OK"
            assert headers["content-type"] == "application/json; charset=utf-8"
            assert "connection" not in headers
            assert answer == b'{"path":"/a/%d","size":%d}' % (index, index)
    finally:
        writer.close()
    assert [path for _, path, _, _ in running.seen] == ["/a/0", "/a/1", "/a/2"]


async def test_pipelined_requests_are_answered_in_order(running: Running) -> None:
    reader, writer = await running.connect()
    try:
        writer.write(
            b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST /second HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
            b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        first = await _read_answer(reader)
        second = await _read_answer(reader)
        third = await _read_answer(reader)
    finally:
        writer.close()
    assert first[2] == b'{"path":"/first","size":0}'
    assert second[2] == b'{"path":"/second","size":3}'
    assert third[1]["transfer-encoding"] == "chunked"
    assert third[2] == b"one two three"


async def test_http10_closes_unless_asked_and_ends_a_stream_with_the_connection(
    running: Running,
) -> None:
    status, headers, body = await running.ask(b"GET /stream HTTP/1.0\r\n\r\n")
    assert status == b"HTTP/1.0 200 OK"
    assert headers["connection"] == "close"
    assert "transfer-encoding" not in headers
    assert body == b"one two three"

    reader, writer = await running.connect()
    try:
        for _ in range(2):
            writer.write(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, _ = await _read_answer(reader)
            assert status == b"HTTP/1.0 200 OK"
            assert headers["connection"] == "keep-alive"
    finally:
        writer.close()


async def test_head_gets_the_headers_only(running: Running) -> None:
    reader, writer = await running.connect()
    try:
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\nGET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        status = await reader.readline()
        head = await reader.readuntil(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 200")
        # The length a GET would get, and no body.
        assert b"Content-Length: %d" % len(b'{"path":"/h","size":0}') in head
        # The next answer follows at once: no body bytes came in between.
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_absolute_form_is_served_as_its_path_and_other_forms_are_400(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, body = await running.ask(
        b"GET http://169.254.169.254:80/v1/models?a=b HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    assert body == b'{"path":"/v1/models","size":0}'
    assert running.seen[-1][2] == "/v1/models?a=b"

    for target in (b"*", b"example.com:443"):
        method = b"CONNECT" if b":" in target else b"OPTIONS"
        status, headers, _ = await running.ask(method + b" " + target + b" HTTP/1.1\r\n\r\n")
        assert status == b"HTTP/1.1 400 Bad Request", target
        assert headers["connection"] == "close"
    assert len(running.seen) == 1
    warnings = [r.msg for r in caplog.records if r.name == "pd_sidecar.http"]
    assert [w["event"] for w in warnings] == ["unparsable_request", "unparsable_request"]


async def test_percent_encoded_paths_are_decoded_and_the_raw_target_kept(
    running: Running,
) -> None:
    await running.ask(b"GET /v1/a%20b?q=%20 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert running.seen[-1][1:3] == ("/v1/a b", "/v1/a%20b?q=%20")


@pytest.mark.parametrize(
    "head",
    [
        b"GET /x HTTP/1.1\r\nX-Long: " + b"v" * MAX_LINE + b"\r\n\r\n",
        b"GET /" + b"p" * MAX_LINE + b" HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.1\r\n"
        + b"".join(b"H%d: v\r\n" % i for i in range(MAX_HEADERS + 1))
        + b"\r\n",
        b"GET /x HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["header-line", "target", "header-count", "nul", "cl-and-te"],
)
async def test_unparsable_heads_are_400_before_any_handler(
    running: Running, caplog: pytest.LogCaptureFixture, head: bytes
) -> None:
    status, headers, body = await running.ask(head)
    assert status == b"HTTP/1.1 400 Bad Request"
    assert headers["connection"] == "close"
    assert body == b"400: Bad Request"
    assert running.seen == []
    [record] = [r for r in caplog.records if r.name == "pd_sidecar.http"]
    assert record.levelno == logging.WARNING
    assert record.msg["event"] == "unparsable_request"
    assert record.exc_info is None


async def test_a_head_that_never_ends_is_refused_at_its_bound(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """One header value sent on and on, never ended by a line break: the parser would
    hold it whole; the head is cut at ``MAX_HEAD`` bytes (and one read)."""
    _, writer = await running.connect()
    writer.write(b"GET /x HTTP/1.1\r\nX-Endless: ")
    sent = 0
    with pytest.raises(ConnectionError):
        while sent < 1024 * MAX_HEAD:  # far more than the kernel's buffers hold
            writer.write(b"v" * 65536)
            await writer.drain()
            sent += 65536
    writer.close()
    # Refused and closed (the 400 itself is lost to the reset of a connection with
    # unread bytes): the client could not go on sending.
    [record] = [r for r in caplog.records if r.name == "pd_sidecar.http"]
    assert "head over" in record.msg["error"]


async def test_an_answer_cannot_be_split_by_a_header_value(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    status, headers, _ = await running.ask(b"GET /split HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == b"HTTP/1.1 500 Internal Server Error"
    assert "injected" not in headers
    assert any(r.exc_info and "CR or LF" in str(r.exc_info[1]) for r in caplog.records)


async def test_a_handler_bug_is_a_500_and_the_connection_closes(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await running.connect()
    writer.write(b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n")
    status, headers, _ = await _read_answer(reader)
    assert await reader.read() == b""
    writer.close()
    assert status == b"HTTP/1.1 500 Internal Server Error"
    assert headers["connection"] == "close"
    assert any(r.exc_info for r in caplog.records if r.name == "pd_sidecar.http")


async def test_expect_100_continue_is_honoured(running: Running) -> None:
    reader, writer = await running.connect()
    try:
        writer.write(
            b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        assert await reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert await reader.readline() == b"\r\n"
        writer.write(b"body")
        _, _, answer = await _read_answer(reader)
    finally:
        writer.close()
    assert answer == b'{"path":"/e","size":4}'


async def test_an_answer_before_the_body_is_read_lets_the_client_finish_then_closes(
    running: Running,
) -> None:
    """A 413 given on the declared length: the body still being sent is read and
    dropped, the client reads the answer, and the connection is not reused."""
    reader, writer = await running.connect()
    size = 4 << 20
    writer.write(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
    for _ in range(size // 65536):
        writer.write(b"z" * 65536)
        await writer.drain()  # the server keeps reading: the client is never stuck
    status, headers, body = await _read_answer(reader)
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    assert headers["connection"] == "close"
    assert body == b'{"refused":true}'
    assert await reader.read() == b""  # closed once the whole body was in
    writer.close()
    assert LINGER_S >= 1.0


async def test_client_leaving_cancels_its_handler(running: Running) -> None:
    _, writer = await running.connect()
    writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    await running.started.wait()
    writer.close()
    async with asyncio.timeout(10):
        await running.cancelled.wait()


async def test_shutdown_lets_a_request_in_flight_finish_and_closes_idle_ones(
    running: Running,
) -> None:
    busy_reader, busy_writer = await running.connect()
    idle_reader, idle_writer = await running.connect()
    idle_writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
    await _read_answer(idle_reader)
    busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    await running.started.wait()
    stopping = asyncio.ensure_future(running.server.shutdown(10.0))
    assert await idle_reader.read() == b""  # the idle connection is closed at once
    running.release.set()
    status, headers, body = await _read_answer(busy_reader)
    await stopping
    assert (status, body) == (b"HTTP/1.1 200 OK", b"done")
    assert headers["connection"] == "close"
    with pytest.raises(OSError):
        await running.connect()  # no longer listening
    busy_writer.close()
    idle_writer.close()


async def test_a_large_body_is_buffered_within_its_bound(running: Running) -> None:
    """A body sent while its handler does not read: reading from the socket pauses at
    the bound (the client's sending stalls), resumes as the handler reads, and the whole
    body arrives."""
    size = 64 << 20  # more than the kernel's socket buffers hold
    reader, writer = await running.connect()
    try:
        writer.write(b"POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            writer.write(b"b" * 65536)
        sending = asyncio.ensure_future(writer.drain())
        # A window for the body to pile up in the server if reading did not pause.
        await asyncio.wait({sending}, timeout=1.0)
        running.release.set()
        await sending
        _, _, body = await _read_answer(reader)
    finally:
        writer.close()
    answer = json.loads(body)
    assert answer["size"] == size
    # At most the bound plus what the reads past it added, not the megabytes sent.
    assert answer["first"] <= BODY_HIGH_WATER + (1 << 20)
