"""The sidecar's HTTP/1.1 server: asyncio protocols and the ``httptools`` parser.

A sidecar answers a few request shapes over and over on connections an Envoy keeps
open; aiohttp's server, built for every kind of application (URL objects, routers,
signals, middleware chains, two tasks per request), took 11% of the sidecar's
instructions per request beyond what this one does. This server does what the sidecar
needs and no more:

- :class:`Request`: method, paths, version, headers (case-insensitive, as sent; values
  read as UTF-8 with undecodable bytes kept as surrogates), the body as it arrives
  (:class:`Body`), the connection's transport, per-request state (``request[key]``) and
  the application's (``request.app``). An absolute-form target
  (``http://host/path?q``) is served as its path; any other form but origin-form is a
  400, as is ``CONNECT``.
- Responses: :class:`StreamResponse` (``prepare`` / ``write`` / ``write_eof``: framed by
  ``content_length`` when set, else chunked, or by the connection's end for HTTP/1.0)
  and :class:`Response` (a whole body, one write), :func:`json_response`.
- Connections: keep-alive (HTTP/1.1 unless ``Connection: close``; HTTP/1.0 when asked),
  pipelined requests answered in order, ``Expect: 100-continue`` honoured. A connection
  is closed when it has not completed a request's headers within ``keepalive_timeout``
  of its start or of its last answer; a client that goes away cancels its handler.
- Bounds: the request line and each header line at most ``MAX_LINE`` bytes, at most
  ``MAX_HEADERS`` headers, the whole head at most ``MAX_HEAD`` bytes; a body buffers at
  most ``BODY_HIGH_WATER`` bytes before reading from the socket pauses (the handler
  bounds the rest); at most ``MAX_PIPELINED`` requests wait behind the one being
  answered. A request the parser refuses (a control character in a header, a line over
  the limit, conflicting framing) is answered 400 before any handler runs, and logged
  as one warning. An answer given before its body was read lets the client finish
  sending (``LINGER_S`` at most), then closes the connection.
- Answers cannot split: a CR or LF in a status reason, header name or value makes the
  answer a 500 before any of it is written. A handler that raises (a bug: handlers
  answer their own failures) is logged with its traceback and answered 500, or its
  connection dropped when its answer had begun.
- :meth:`Server.shutdown`: stop accepting, close idle connections, let requests in
  flight finish within a timeout (their answers then close the connection), then cancel
  what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from common.json_codec import dumps
from sidecar.headers import HEADER_ENCODING, HEADER_ERRORS

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "BODY_HIGH_WATER",
    "LINGER_S",
    "MAX_HEAD",
    "MAX_HEADERS",
    "MAX_LINE",
    "MAX_PIPELINED",
    "Body",
    "Handler",
    "HttpVersion",
    "Request",
    "RequestKey",
    "Response",
    "Server",
    "StreamResponse",
    "json_response",
]

MAX_LINE = 8190  # bytes in the request line, and in one header line
MAX_HEADERS = 256
# Bytes a request's head may take before it is complete (the parser holds a header until
# its line ends): beyond it the request is refused, whatever its lines look like.
MAX_HEAD = 64 * 1024
BODY_HIGH_WATER = 1 << 18  # buffered request-body bytes before reading pauses
MAX_PIPELINED = 4  # requests parsed ahead of the one being answered
# After an answer given before its request's body was read (a 413, say), the rest of the
# body is read and dropped for up to this long, so that the client, still sending, gets
# to read the answer; then the connection closes.
LINGER_S = 10.0

_REASONS = {status.value: status.phrase for status in HTTPStatus}
_EMPTY_BODY_STATUSES = frozenset({204, 304})
_FRAMING = ("Content-Length", "Transfer-Encoding")


class HttpVersion(NamedTuple):
    major: int
    minor: int


HTTP10 = HttpVersion(1, 0)
HTTP11 = HttpVersion(1, 1)
_VERSIONS = {"1.1": HTTP11, "1.0": HTTP10}


T = TypeVar("T")


class RequestKey(Generic[T]):
    """A typed key of per-request state: ``request[key]``."""

    __slots__ = ("name",)

    def __init__(self, name: str, kind: type[T]) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<RequestKey {self.name}>"


class _Refused(Exception):
    """A request refused while its head is parsed: answered 400, connection closed."""


class Body:
    """A request body as it arrives: ``readany`` / ``iter_any`` / ``read`` /
    ``read_nowait``; ``is_eof``: the whole body arrived (some may still be unread).
    Reading raises ``ConnectionResetError`` when the client went away mid-body."""

    __slots__ = ("_chunks", "_conn", "_discard", "_eof", "_error", "_size", "_waiter")

    def __init__(self, conn: _Connection | None) -> None:
        self._conn = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = conn is None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._discard = False

    def is_eof(self) -> bool:
        return self._eof

    def read_nowait(self) -> bytes:
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        if self._conn is not None:
            self._conn.body_drained()
        return data

    async def readany(self) -> bytes:
        """What has arrived (waiting for something first), or b"" at the end."""
        while not self._chunks and not self._eof:
            if self._error is not None:
                raise self._error
            assert self._conn is not None
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if not self._chunks and self._error is not None:
            raise self._error
        return self.read_nowait()

    async def iter_any(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self.readany()
            if not chunk:
                return
            yield chunk

    async def read(self) -> bytes:
        chunks = []
        while chunk := await self.readany():
            chunks.append(chunk)
        return b"".join(chunks)

    # -- the connection's side --

    def feed(self, data: bytes) -> None:
        if self._discard:
            return
        self._chunks.append(data)
        self._size += len(data)
        self._wake()

    def end(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self._eof:
            self._error = error
            self._wake()

    def discard(self) -> None:
        """Nobody reads the rest: drop what is buffered and what still arrives."""
        self._discard = True
        self._chunks = []
        self._size = 0

    @property
    def buffered(self) -> int:
        return self._size

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


_NO_BODY = Body(None)


class Request:
    """One client request, as a handler sees it."""

    __slots__ = (
        "_conn",
        "_path",
        "_state",
        "app",
        "body_exists",
        "content",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "raw_path",
        "version",
    )

    def __init__(
        self,
        conn: _Connection | None,
        app: web.Application,
        method: str,
        raw_path: str,
        version: HttpVersion,
        headers: CIMultiDictProxy[str],
        content: Body,
        *,
        keep_alive: bool = True,
        content_length: int | None = None,
        body_exists: bool = False,
    ) -> None:
        self._conn = conn
        self.app = app
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.content = content
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.body_exists = body_exists
        self._path: str | None = None
        self._state: dict[RequestKey[Any], Any] = {}

    @property
    def path(self) -> str:
        """The target's path, percent-decoded (without the query)."""
        path = self._path
        if path is None:
            raw = self.raw_path.partition("?")[0]
            path = self._path = URL.build(path=raw, encoded=True).path if "%" in raw else raw
        return path

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport if self._conn is not None else None

    @property
    def host(self) -> str:
        return self.headers.get("Host", "")

    @property
    def secure(self) -> bool:
        transport = self.transport
        return transport is not None and transport.get_extra_info("sslcontext") is not None

    def __getitem__(self, key: RequestKey[T]) -> T:
        return self._state[key]  # type: ignore[no-any-return]

    def __setitem__(self, key: RequestKey[T], value: T) -> None:
        self._state[key] = value


Handler = Callable[[Request], Awaitable["StreamResponse"]]


class StreamResponse:
    """An answer written as it is produced: ``prepare`` sends the head, ``write`` the
    body's pieces, ``write_eof`` ends it."""

    def __init__(
        self,
        *,
        status: int = 200,
        reason: str | None = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers: CIMultiDict[str] = (
            CIMultiDict(headers) if headers is not None else CIMultiDict()
        )
        self.content_length: int | None = None
        self.body_length = 0
        self._conn: _Connection | None = None
        self._chunked = False
        self._empty = False  # HEAD, 204, 304: no body whatever is written
        self._eof_sent = False

    async def prepare(self, request: Request) -> None:
        if self._conn is not None or request._conn is None:
            return
        conn = request._conn
        head = self._head(request, self.content_length)
        self._conn = conn
        conn.write(head)
        conn.head_sent = True
        if conn.write_paused:
            await conn.drain()

    async def write(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            raise RuntimeError("write() before prepare()")
        if self._eof_sent:
            raise RuntimeError("write() after write_eof()")
        if not data or self._empty:
            return
        self.body_length += len(data)
        if self._chunked:
            conn.write_chunk(data)
        else:
            conn.write(data)
        if conn.write_paused:
            await conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        conn = self._conn
        if conn is None:
            raise RuntimeError("write_eof() before prepare()")
        if data:
            await self.write(data)
        self._eof_sent = True
        if self._chunked:
            conn.write(b"0\r\n\r\n")
        if conn.write_paused:
            await conn.drain()

    def _head(self, request: Request, length: int | None) -> bytes:
        """The status line and headers, framing included."""
        conn = request._conn
        assert conn is not None
        status = self.status
        version = request.version
        headers = self.headers
        for name in _FRAMING:
            if name in headers:
                del headers[name]
        self._empty = request.method == "HEAD" or status in _EMPTY_BODY_STATUSES or status < 200
        # A body not read to its end is dropped after the answer, and the connection
        # with it: the client is told so.
        keep_alive = request.keep_alive and conn.keeps_alive() and request.content.is_eof()
        if length is not None:
            if status not in _EMPTY_BODY_STATUSES and status >= 200:
                headers["Content-Length"] = str(length)
        elif not self._empty:
            if version >= HTTP11:
                self._chunked = True
                headers["Transfer-Encoding"] = "chunked"
            else:
                keep_alive = False  # the body ends with the connection
        if not keep_alive:
            headers["Connection"] = "close"
            conn.close_after_answer()
        elif version < HTTP11:
            headers["Connection"] = "keep-alive"
        if "Content-Type" not in headers and not self._empty:
            headers["Content-Type"] = "application/octet-stream"
        if "Date" not in headers:
            headers["Date"] = _http_date()
        reason = self.reason if self.reason is not None else _REASONS.get(status, "")
        lines = [f"HTTP/{version.major}.{version.minor} {status} {reason}"]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        lines.append("\r\n")
        text = "\r\n".join(lines)
        # Exactly one CR and one LF per line: nothing in a value can start a new one.
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):
            raise ValueError("a CR or LF in the answer's status reason or headers")
        return text.encode(HEADER_ENCODING, HEADER_ERRORS)


class Response(StreamResponse):
    """A whole answer, sent in one write."""

    def __init__(
        self,
        *,
        body: bytes | None = None,
        status: int = 200,
        reason: str | None = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        content_type: str | None = None,
    ) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        self.body = body or b""

    async def prepare(self, request: Request) -> None:
        if self._conn is not None or request._conn is None:
            return
        conn = request._conn
        body = self.body
        head = self._head(request, len(body))
        self._conn = conn
        self._eof_sent = True
        if body and not self._empty:
            self.body_length = len(body)
            conn.write_all((head, body))
        else:
            conn.write(head)
        conn.head_sent = True
        if conn.write_paused:
            await conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self._conn is None:
            raise RuntimeError("write_eof() before prepare()")


def json_response(
    data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        body=dumps(data),
        status=status,
        headers=headers,
        content_type="application/json; charset=utf-8",
    )


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    second, text = _date_cache
    if second != now:
        text = formatdate(now, usegmt=True)
        _date_cache = (now, text)
    return text


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs their handler, writes the answers."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: list[tuple[str, str]] = []
        self._parsing: Body | None = None  # the body being received
        self._queue: deque[Request] = deque()  # parsed, waiting for the one being served
        self._task: asyncio.Task[None] | None = None  # the request being served
        self._closing = False  # close once the answer in progress is out
        self._reading_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.idle_since: float | None = None  # waiting for a request's headers since
        self.head_sent = False  # the answer in progress has begun
        self._lingering: asyncio.TimerHandle | None = None  # closes a lingering connection
        self._in_head = False  # between a request's first byte and the end of its head
        self._head_began = False  # ... which began in the data being parsed
        self._head_size = 0

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.idle_since = self.loop.time()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        self._closing = True
        lost = ConnectionResetError("the client closed the connection")
        if self._parsing is not None:
            self._parsing.fail(lost)
        for request in self._queue:
            request.content.fail(lost)
        self._queue.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: so does its request
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(lost)

    def data_received(self, data: bytes) -> None:
        if self._closing and self._lingering is None:
            return
        self._head_began = False
        try:
            self._parser.feed_data(data)
            if self._in_head and not self._head_began:
                # All of this data went to the head being read (a head that began in
                # it is counted from the next data on: at most one read more).
                self._head_size += len(data)
                if self._head_size > MAX_HEAD:
                    raise _Refused(f"request head over {MAX_HEAD} bytes")
        except httptools.HttpParserUpgrade:
            # No protocol switch here: the request is answered, then the connection ends.
            self._closing = True
            self._pause_reading()
        except (httptools.HttpParserError, _Refused) as exc:
            self._refuse(exc)

    def eof_received(self) -> bool | None:
        if self._parsing is not None:
            self._parsing.fail(ConnectionResetError("the client ended the body early"))
        return None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        self._in_head = self._head_began = True
        self._head_size = 0
        self._url = []
        self._url_size = 0
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        if self._url_size > MAX_LINE:
            raise _Refused(f"request target over {MAX_LINE} bytes")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) + 2 > MAX_LINE:
            raise _Refused(f"header line over {MAX_LINE} bytes")
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            raise _Refused(f"more than {MAX_HEADERS} headers")
        headers.append(
            (
                name.decode(HEADER_ENCODING, HEADER_ERRORS),
                value.decode(HEADER_ENCODING, HEADER_ERRORS),
            )
        )

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        method = parser.get_method().decode("ascii")
        if method == "CONNECT":
            raise _Refused("CONNECT is not served")
        target = b"".join(self._url)
        if not target.startswith(b"/"):
            target = _origin_form(target)
        version = _VERSIONS.get(parser.get_http_version(), HTTP11)
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        length_text = headers.get("Content-Length")
        length = int(length_text) if length_text is not None else None
        chunked = "Transfer-Encoding" in headers
        body_exists = chunked or bool(length)
        body = Body(self) if body_exists else _NO_BODY
        self._parsing = body if body_exists else None
        request = Request(
            self,
            self.server.app,
            method,
            target.decode("utf-8", "surrogateescape"),
            version,
            headers,
            body,
            keep_alive=parser.should_keep_alive(),
            content_length=length,
            body_exists=body_exists,
        )
        self.idle_since = None
        if body_exists and version >= HTTP11:
            expect = headers.get("Expect")
            if expect is not None and expect.lower() == "100-continue" and self.transport:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._task is None:
            self._serve(request)
        else:
            self._queue.append(request)
            if len(self._queue) >= MAX_PIPELINED:
                self._pause_reading()

    def on_body(self, body: bytes) -> None:
        parsing = self._parsing
        if parsing is not None:
            parsing.feed(body)
            if parsing.buffered > BODY_HIGH_WATER:
                self._pause_reading()

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing.end()
            self._parsing = None
        if self._lingering is not None:
            # The body of an answered request is all in: done with this connection.
            self._lingering.cancel()
            self._lingering = None
            self._close()

    # -- serving --

    def _serve(self, request: Request) -> None:
        self.head_sent = False
        self._task = self.loop.create_task(self._answer(request))

    async def _answer(self, request: Request) -> None:
        server = self.server
        try:
            try:
                response = await server.handler(request)
                await response.prepare(request)
                await response.write_eof()
            except (asyncio.CancelledError, ConnectionError):
                raise
            except Exception:
                # Handlers answer their own failures: this is a bug in one (or an
                # answer refused for a CR or LF in its head).
                server.log.exception({"event": "internal_error", "path": request.raw_path})
                if self.head_sent:
                    raise ConnectionResetError("answer broken midway") from None
                self._closing = True
                failed = json_response({"error": {"message": "internal error"}}, status=500)
                await failed.prepare(request)
        except (asyncio.CancelledError, ConnectionError):
            self._task = None
            self._close()
            return
        self._task = None
        body = request.content
        if not body.is_eof():
            # The rest of the body is still on the wire: read and dropped while the
            # client finishes sending, then the connection closes.
            self._closing = True
            body.discard()
            self._lingering = self.loop.call_later(LINGER_S, self._close)
            self._maybe_resume_reading(lingering=True)
            return
        self._answered()

    def _answered(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self._closing or self.server.draining:
            transport.close()
            return
        if self._queue:
            self._serve(self._queue.popleft())
        else:
            self.idle_since = self.loop.time()
        self._maybe_resume_reading()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def _refuse(self, exc: Exception) -> None:
        """A request the parser refused: 400 (after the answer in progress), then close."""
        message = str(exc) or type(exc).__name__
        if isinstance(exc, httptools.HttpParserCallbackError) and exc.__context__ is not None:
            message = str(exc.__context__)
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        self.server.log.warning(
            {
                "event": "unparsable_request",
                "remote": peer[0] if peer else None,
                "status": 400,
                "error": message,
            }
        )
        self._closing = True
        if self._parsing is not None:
            self._parsing.fail(ConnectionResetError("the request could not be parsed"))
        if self._task is None and transport is not None:
            text = b"400: Bad Request"
            transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(text), text)
            )
            transport.close()

    # -- what answers need --

    def keeps_alive(self) -> bool:
        return not self._closing and not self.server.draining

    def close_after_answer(self) -> None:
        self._closing = True

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("cannot write to a closing connection")
        transport.write(data)

    def write_all(self, parts: tuple[bytes, ...]) -> None:
        """Several buffers in one go, none copied into another."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("cannot write to a closing connection")
        transport.writelines(parts)

    def write_chunk(self, data: bytes) -> None:
        self.write_all((b"%x\r\n" % len(data), data, b"\r\n"))

    async def drain(self) -> None:
        if not self.write_paused:
            return
        if self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        self._drain_waiter = self.loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    def body_drained(self) -> None:
        self._maybe_resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self, *, lingering: bool = False) -> None:
        if not self._reading_paused or self.transport is None:
            return
        if self._closing and not lingering:
            return
        if len(self._queue) >= MAX_PIPELINED:
            return
        if self._parsing is not None and self._parsing.buffered > BODY_HIGH_WATER:
            return
        self._reading_paused = False
        self.transport.resume_reading()

    # -- shutdown --

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The handler of the request being answered, if any."""
        return self._task

    def close_if_idle(self) -> None:
        if self._task is None and self.transport is not None:
            self._closing = True
            self.transport.close()

    def cancel(self) -> asyncio.Task[None] | None:
        task = self._task
        if task is not None:
            task.cancel()
        if self.transport is not None:
            self.transport.abort()
        return task


def _origin_form(target: bytes) -> bytes:
    """The path (and query) of an absolute-form target (RFC 9112 section 3.2.2)."""
    if b"://" not in target:
        raise _Refused("request target is neither a path nor an absolute URL")
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        raise _Refused("request target is not a valid URL") from None
    path = url.path or b"/"
    return path + b"?" + url.query if url.query else path


class Server:
    """Listening sockets serving ``handler``; ``app`` is what handlers see as
    ``request.app``."""

    def __init__(
        self,
        handler: Handler,
        app: web.Application,
        *,
        keepalive_timeout: float,
        log: logging.Logger,
    ) -> None:
        self.handler = handler
        self.app = app
        self.keepalive_timeout = keepalive_timeout
        self.log = log
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.draining = False
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.TimerHandle | None = None

    async def listen(
        self, host: str, port: int, *, ssl: Any = None, reuse_port: bool | None = None
    ) -> int:
        """Listen on ``host:port`` (0: any free port); the port bound."""
        server = await self.loop.create_server(
            lambda: _Connection(self), host, port, ssl=ssl, reuse_port=reuse_port, backlog=1024
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweep()
        return int(server.sockets[0].getsockname()[1])

    def _sweep(self) -> None:
        """Close the connections that waited for a request's headers too long."""
        now = self.loop.time()
        limit = now - self.keepalive_timeout
        for conn in list(self.connections):
            idle_since = conn.idle_since
            if idle_since is not None and idle_since <= limit and conn.task is None:
                conn.close_if_idle()
        grain = min(1.0, max(self.keepalive_timeout / 8, 0.01))
        self._sweeper = self.loop.call_later(grain, self._sweep)

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting; finish requests in flight within ``grace_s``; close all."""
        self.draining = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        in_flight = [conn.task for conn in self.connections if conn.task is not None]
        if in_flight:
            # Each ends with its answer; draining, its connection then closes.
            await asyncio.wait(in_flight, timeout=grace_s)
        tasks = [task for conn in list(self.connections) if (task := conn.cancel()) is not None]
        if tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait(tasks, timeout=5.0)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=1.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
