"""A lean HTTP/1.1 client for the engine legs: asyncio protocols, the ``httptools`` parser,
keep-alive pools per host.

The engine legs are a handful of hosts answering the same few requests over and over;
aiohttp's general-purpose client spent most of the sidecar's CPU on them. This one does
only what the legs need, with aiohttp's interface and exceptions (so ``sidecar.upstream``
translates failures the same way):

- :meth:`Http1Client.request` returns once the status line and headers arrived; the
  :class:`Http1Response` body is read with ``content.readany()`` / ``is_eof()`` /
  ``read_nowait()``; ``release()`` returns a fully read connection to its pool,
  ``close()`` (or releasing a half-read answer) closes it;
- bodies: ``bytes`` (Content-Length), an async iterator (chunked, or as is when the
  caller gives a Content-Length), or none; answers with Content-Length, chunked, or
  delimited by the connection's end; gzip/deflate answers decoded when ``decompress``;
- limits: ``limit`` connections in use in all, ``limit_per_host`` per host (0: none); a
  request over a limit waits for a connection to be given back;
- an idle connection is closed after ``keepalive_timeout``; connecting is bounded by
  ``connect_timeout`` (``aiohttp.ConnectionTimeoutError``);
- TLS with the given context (``https://`` URLs), the server name checked by it;
- failures: ``ClientConnectorError`` (cannot connect, TLS handshake refused: the
  ``ssl.SSLError`` is its ``os_error``), ``ServerDisconnectedError`` (closed before any
  answer byte), ``ClientOSError`` (reset), ``ClientPayloadError`` (a body cut short or
  malformed). Cancelling a request closes its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NamedTuple

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.headers import HEADER_ENCODING, HEADER_ERRORS

__all__ = ["Http1Client", "Http1Response"]

_MAX_TARGETS = 1024
_HIGH_WATER = 1 << 18  # buffered answer bytes before reading from the socket pauses
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_FRAMING = frozenset({"content-length", "transfer-encoding", "host"})


class _Key(NamedTuple):
    """A pool: where connections go (and what ``ClientConnectorError`` names)."""

    host: str
    port: int
    ssl: Any


class _Target(NamedTuple):
    key: _Key
    head: str  # " <path> HTTP/1.1\r\nHost: <authority>\r\n"
    server_hostname: str | None


def _target(url: str, ssl_context: ssl.SSLContext | None) -> _Target:
    parsed = URL(url)
    host = parsed.raw_host or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    secure = parsed.scheme == "https"
    if secure and ssl_context is None:
        ssl_context = ssl.create_default_context()
    authority = f"[{host}]" if ":" in host else host
    if not parsed.is_default_port():
        authority = f"{authority}:{port}"
    head = f" {parsed.raw_path_qs} HTTP/1.1\r\nHost: {authority}\r\n"
    key = _Key(host, port, ssl_context if secure else False)
    return _Target(key, head, host if secure else None)


class _Body:
    """An answer's body as it arrives (aiohttp's ``StreamReader`` reading methods)."""

    __slots__ = ("_chunks", "_conn", "_eof", "_eof_callbacks", "_exc", "_size", "_waiter")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._eof_callbacks: list[Callable[[], None]] = []

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER:
            self._conn.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()
        self._ended()

    def fail(self, exc: BaseException) -> None:
        self._exc = exc
        self._wake()
        self._ended()

    def on_eof(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the body has ended (at once if it already has); a body
        cut short by an error ends too."""
        if self._eof or self._exc is not None:
            callback()
        else:
            self._eof_callbacks.append(callback)

    def _ended(self) -> None:
        callbacks, self._eof_callbacks = self._eof_callbacks, []
        for callback in callbacks:
            callback()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def is_eof(self) -> bool:
        return self._eof

    def read_nowait(self) -> bytes:
        """Everything buffered (``b""`` at the end)."""
        if self._exc is not None and not self._chunks:
            raise self._exc
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._size > _HIGH_WATER:
            self._conn.resume_reading()
        self._size = 0
        return data

    async def readany(self) -> bytes:
        """What arrived since the last read, waiting for some; ``b""`` at the end."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._waiter = self._conn.loop.create_future()
            await self._waiter
        return self.read_nowait()

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    async def read(self, n: int = -1) -> bytes:
        """The rest of the body (``n`` is an upper bound, as a hint only)."""
        chunks = []
        while chunk := await self.readany():
            chunks.append(chunk)
        return b"".join(chunks)


class Http1Response:
    """One answer: status and headers at once, the body as it arrives."""

    __slots__ = ("_conn", "_decoder", "content", "headers", "reason", "status")

    def __init__(self, conn: _Connection, status: int, reason: str, headers: CIMultiDict[str]):
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason
        self.headers = CIMultiDictProxy(headers)
        self.content = _Body(conn)
        self._decoder: Any = None

    @property
    def content_type(self) -> str:
        value = self.headers.get("Content-Type")
        if not value:
            return "application/octet-stream"
        return value.split(";", 1)[0].strip().lower()

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def release(self) -> None:
        """Give the connection back when the body was read to its end, else close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.done(reusable=self.content.is_eof() and self.content._exc is None)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.done(reusable=False)

    async def read(self) -> bytes:
        return await self.content.read()

    async def text(self) -> str:
        return (await self.read()).decode()

    async def __aenter__(self) -> Http1Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class _Connection(asyncio.Protocol):
    """One pooled connection and the answer it is reading."""

    def __init__(self, client: Http1Client, key: _Key, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self.key = key
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._reason = ""
        self._waiter: asyncio.Future[Http1Response] | None = None
        self._response: Http1Response | None = None
        self._until_close = False
        self._complete = False
        self._keep_alive = False
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self.closed = False
        self.idle_since = 0.0
        self.decompress = client.decompress
        self.head = False

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(aiohttp.ClientPayloadError("upgrade answers are not supported"))
        except httptools.HttpParserError as exc:
            self._broken(aiohttp.ClientPayloadError(f"malformed answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._client._forget(self)
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_exception(aiohttp.ServerDisconnectedError())
            else:
                failure = aiohttp.ClientOSError(
                    getattr(exc, "errno", None) or errno.ECONNRESET, f"connection lost: {exc!r}"
                )
                failure.__cause__ = exc
                waiter.set_exception(failure)
        response = self._response
        if response is not None and not self._complete:
            if self._until_close and exc is None:
                self._finish_body(response)
            else:
                response.content.fail(
                    aiohttp.ClientPayloadError(f"answer cut short: connection lost ({exc!r})")
                )

    def pause_writing(self) -> None:
        self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    # -- httptools callbacks --------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self._reason = reason.decode(HEADER_ENCODING, HEADER_ERRORS)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.add(
            name.decode(HEADER_ENCODING, HEADER_ERRORS),
            value.decode(HEADER_ENCODING, HEADER_ERRORS),
        )

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:  # 1xx: the answer proper follows
            self._headers = CIMultiDict()
            return
        headers, self._headers = self._headers, CIMultiDict()
        response = Http1Response(self, status, self._reason, headers)
        self._keep_alive = parser.should_keep_alive()
        self._until_close = (
            "Content-Length" not in headers
            and "chunked" not in headers.get("Transfer-Encoding", "").lower()
            and status not in (204, 304)
            and not self.head
        )
        if self.decompress:
            encoding = headers.get("Content-Encoding", "").lower()
            if encoding in ("gzip", "x-gzip"):
                response._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
            elif encoding == "deflate":
                response._decoder = zlib.decompressobj()
        self._response = response
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if self.head:
            self._keep_alive = False
            self._finish_body(response)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is None or self._complete:
            return
        if response._decoder is not None:
            try:
                body = response._decoder.decompress(body)
            except zlib.error as exc:
                self._broken(aiohttp.ClientPayloadError(f"cannot decode the answer: {exc}"))
                return
        if body:
            response.content.feed(body)

    def on_message_complete(self) -> None:
        response = self._response
        if response is not None and not self._complete:
            self._finish_body(response)

    # -- the connection's life ------------------------------------------------------

    def _finish_body(self, response: Http1Response) -> None:
        self._complete = True
        if response._decoder is not None:
            tail = response._decoder.flush()
            if tail:
                response.content.feed(tail)
        response.content.feed_eof()

    def _broken(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self._response is not None and not self._complete:
            self._response.content.fail(exc)
        self.abort()

    def abort(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.cancel()  # nobody waits for it any more
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    async def send(
        self, method: str, head: str, headers: Iterable[tuple[str, str]], body: Any
    ) -> Http1Response:
        transport = self.transport
        assert transport is not None
        self.head = method == "HEAD"
        lines = [method, head]
        given_length: str | None = None
        for name, value in headers:
            lower = name.lower()
            if lower in _FRAMING:
                if lower == "content-length":
                    given_length = value
                continue
            lines.append(f"{name}: {value}\r\n")
        self._waiter = self.loop.create_future()
        if body is None or isinstance(body, bytes):
            if body or method in _BODY_METHODS:
                lines.append(f"Content-Length: {len(body or b'')}\r\n\r\n")
            else:
                lines.append("\r\n")
            request_head = "".join(lines).encode(HEADER_ENCODING, HEADER_ERRORS)
            if body:
                # The body goes out as its own buffer: not copied behind the head.
                transport.writelines((request_head, body))
            else:
                transport.write(request_head)
        else:
            chunked = given_length is None
            if chunked:
                lines.append("Transfer-Encoding: chunked\r\n\r\n")
            else:
                lines.append(f"Content-Length: {given_length}\r\n\r\n")
            transport.write("".join(lines).encode(HEADER_ENCODING, HEADER_ERRORS))
            async for chunk in body:
                if self.closed:
                    break
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                if self._drain is not None:
                    await self._drain
            if chunked and not self.closed:
                transport.write(b"0\r\n\r\n")
        return await self._waiter

    def done(self, *, reusable: bool) -> None:
        if (
            reusable
            and self._complete
            and self._keep_alive
            and not self.closed
            and not self._paused
        ):
            self._response = None
            self._complete = False
            self._client._give_back(self, reuse=True)
        else:
            self.abort()
            self._client._give_back(self, reuse=False)


class Http1Client:
    """Keep-alive pools of HTTP/1.1 connections, one per host (see the module's doc)."""

    def __init__(
        self,
        *,
        limit: int,
        limit_per_host: int = 0,
        keepalive_timeout: float,
        connect_timeout: float,
        decompress: bool,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.limit = limit
        self.limit_per_host = limit_per_host
        self.keepalive_timeout = keepalive_timeout
        self.connect_timeout = connect_timeout
        self.decompress = decompress
        self.ssl_context = ssl_context
        self._targets: dict[str, _Target] = {}
        self._idle: dict[_Key, list[_Connection]] = {}
        self._in_use = 0
        self._in_use_by_host: dict[_Key, int] = {}
        # Requests waiting for room, each with the host it is for, in arrival order.
        self._waiters: deque[tuple[_Key, asyncio.Future[None]]] = deque()
        self._open: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    def _target(self, url: str) -> _Target:
        found = self._targets.get(url)
        if found is None:
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            found = self._targets[url] = _target(url, self.ssl_context)
        return found

    async def request(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> Http1Response:
        """Send one request; return once the answer's status and headers arrived."""
        target = self._target(url)
        conn = await self._acquire(target)
        try:
            return await conn.send(method, target.head, headers.items(), body)
        except BaseException:
            conn.done(reusable=False)
            raise

    # -- the pool -------------------------------------------------------------------

    def _has_room(self, key: _Key) -> bool:
        if self.limit and self._in_use >= self.limit:
            return False
        return not (self.limit_per_host and self._in_use_by_host.get(key, 0) >= self.limit_per_host)

    async def _acquire(self, target: _Target) -> _Connection:
        key = target.key
        while not self._has_room(key):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append((key, waiter))
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the turn on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove((key, waiter))
                raise
        self._in_use += 1
        self._in_use_by_host[key] = self._in_use_by_host.get(key, 0) + 1
        idle = self._idle.get(key)
        if idle:
            expired = time.monotonic() - self.keepalive_timeout
            while idle:
                conn = idle.pop()  # the most recently used: the least likely to be stale
                if conn.closed:
                    continue
                if conn.idle_since < expired:
                    conn.abort()
                    continue
                return conn
        try:
            return await self._connect(target)
        except BaseException:
            self._release_slot(key)
            raise

    async def _connect(self, target: _Target) -> _Connection:
        key = target.key
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, key, loop),
                    key.host,
                    key.port,
                    ssl=key.ssl or None,
                    server_hostname=target.server_hostname,
                )
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError(
                f"connection to {key.host}:{key.port} timed out after {self.connect_timeout:g}s"
            ) from None
        except OSError as exc:  # ssl.SSLError is one
            raise aiohttp.ClientConnectorError(key, exc) from exc  # type: ignore[arg-type]
        self._open.add(conn)
        return conn

    def _release_slot(self, key: _Key) -> None:
        self._in_use -= 1
        left = self._in_use_by_host.get(key, 1) - 1
        if left:
            self._in_use_by_host[key] = left
        else:
            self._in_use_by_host.pop(key, None)
        self._wake_one()

    def _wake_one(self) -> None:
        """Wake the first waiter that now has room: with a per-host limit, one waiting
        for a host still at its limit must not take the turn of one whose host is free."""
        for i, (key, waiter) in enumerate(self._waiters):
            if waiter.done():
                continue
            if self._has_room(key):
                del self._waiters[i]
                waiter.set_result(None)
                return

    def _give_back(self, conn: _Connection, *, reuse: bool) -> None:
        self._release_slot(conn.key)
        if not reuse or self.closed:
            if not conn.closed:
                conn.abort()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(self.keepalive_timeout / 2, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for longer than the keep-alive timeout (one timer
        per client, every half timeout, rather than one per idle connection)."""
        self._sweeper = None
        expired = time.monotonic() - self.keepalive_timeout
        for key, idle in list(self._idle.items()):
            kept = []
            for conn in idle:
                if conn.closed:
                    continue
                if conn.idle_since < expired:
                    conn.abort()
                else:
                    kept.append(conn)
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if self._idle and not self.closed:
            self._sweeper = asyncio.get_running_loop().call_later(
                self.keepalive_timeout / 2, self._sweep
            )

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)

    async def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
