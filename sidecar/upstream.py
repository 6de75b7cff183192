"""Client side of each stage: one session and pool per stage, and the stale-connection rule.

vLLM (uvicorn) closes idle keep-alive connections after 5 s, so pools keep theirs for
less; a pooled connection the server closed anyway is detected on use
(``ServerDisconnectedError`` before any response byte) and the request is sent once more
on a fresh connection. Only whole in-memory bodies are resent.

With ``--tracing`` each request is sent under a CLIENT span (:func:`sidecar.tracing.send_traced`),
the ``traceparent`` it carries on the wire.

A stage reached over TLS (``--enable-tls``) has its session's context and turns the
``http://`` URLs the rest of the sidecar builds into ``https://``; a failed handshake
(untrusted certificate, a client certificate the upstream refuses) becomes one clear
error naming the stage and TLS, translated here.
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from common import deadlines
from sidecar.errors import (
    DecodeError,
    DecodeNotReady,
    DecodeTimeout,
    PrefillUnavailable,
    SidecarError,
    UpstreamTLSError,
)
from sidecar.http1 import Http1Client, Http1Response
from sidecar.tracing import client_tracing, send_traced

__all__ = [
    "RETRYABLE_STATUSES",
    "Answer",
    "AnswerTooLarge",
    "Response",
    "Retryable",
    "StageErrors",
    "Upstream",
    "make_session",
    "read_bounded",
]

# Answers worth sending to the next target of a list (prefillers, encoders).
RETRYABLE_STATUSES = frozenset({502, 503, 504})

_MAX_URLS = 1024


# An engine leg's answer: the lean client's, or aiohttp's (the same reading interface).
Response = Http1Response | aiohttp.ClientResponse


class Retryable(Exception):
    """A failure worth one more attempt on the next target of a list; ``error`` is what
    the client gets when no attempt is left."""

    def __init__(self, error: SidecarError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True, slots=True)
class StageErrors:
    """How one stage names what went wrong with a whole-answer exchange (:meth:`Upstream.fetch`)."""

    timeout: Callable[[str], SidecarError]  # (message)
    failed: Callable[[str, str], SidecarError]  # (message, reason)
    too_large_reason: str = "protocol"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str | None
    body: bytes


class AnswerTooLarge(aiohttp.ClientPayloadError):
    """An answer over the size a stage accepts."""


async def read_bounded(response: Response, limit: int) -> bytes:
    """The whole body (read to the end so the connection can be reused), at most ``limit``."""
    if response.content_length is not None and response.content_length > limit:
        raise AnswerTooLarge(f"answer of {response.content_length} bytes")
    content = response.content
    if content.is_eof():
        whole = content.read_nowait()
        if len(whole) > limit:
            raise AnswerTooLarge(f"answer over {limit} bytes")
        return whole
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            raise AnswerTooLarge(f"answer over {limit} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def make_session(
    *,
    limit: int,
    keepalive_timeout: float,
    connect_timeout: float,
    decompress: bool,
    ssl_context: ssl.SSLContext | None = None,
    limit_per_host: int = 0,
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=limit,
        limit_per_host=limit_per_host,  # 0: no per-host limit
        keepalive_timeout=keepalive_timeout,
        ttl_dns_cache=10,
        ssl=ssl_context if ssl_context is not None else True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout),
        auto_decompress=decompress,
        cookie_jar=aiohttp.DummyCookieJar(),  # never share cookies between clients
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )


def _is_stale(exc: BaseException) -> bool:
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    return (
        isinstance(exc, aiohttp.ClientOSError)
        and not isinstance(exc, aiohttp.ClientConnectorError)
        and exc.errno in (errno.ECONNRESET, errno.EPIPE)
    )


def _tls_failure(exc: BaseException) -> BaseException | None:
    """The TLS error behind a client error, if that is what it is."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError | aiohttp.ClientSSLError):
            return seen
        os_error = getattr(seen, "os_error", None)
        if isinstance(os_error, ssl.SSLError):
            return os_error
        seen = seen.__cause__ or seen.__context__
    return None


def tls_error(stage: str, target: str, failure: BaseException) -> SidecarError:
    """The error a failed TLS handshake with ``stage`` becomes (502, naming stage and TLS)."""
    detail = getattr(failure, "os_error", None) or failure
    if isinstance(detail, ssl.SSLCertVerificationError):
        reason = f"certificate verify failed: {detail.verify_message}"
    else:
        reason = str(getattr(detail, "reason", None) or detail)
    message = f"TLS with the {stage} upstream {target} failed: {reason}"
    if stage == "prefill":
        return PrefillUnavailable(message, "tls")
    if stage == "decode":
        return DecodeError(message)
    return UpstreamTLSError(stage, message)


class Upstream:
    """One stage's client plus the one transparent resend on a stale pooled connection.

    The legs go through ``client`` (:mod:`sidecar.http1`) when there is one, else through
    ``session``, which also serves what connectors ask of the stage (``prepare``)."""

    def __init__(
        self,
        stage: str,
        session: aiohttp.ClientSession,
        on_stale: Callable[[str], None],
        *,
        tls: bool = False,
        client: Http1Client | None = None,
    ) -> None:
        self.stage = stage
        self.session = session
        self.client = client
        self._on_stale = on_stale
        self.tls = tls
        # Parsed URLs by their text: a proxy sends to the same few URLs over and over.
        self._urls: dict[str, URL] = {}

    def _url(self, url: str) -> URL:
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= _MAX_URLS:
                self._urls.clear()
            parsed = self._urls[url] = URL(url)
        return parsed

    def send(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> Awaitable[Response]:
        """Send and return once response headers arrived; the caller releases the response."""
        if self.tls and url.startswith("http://"):
            url = "https://" + url[len("http://") :]
        if client_tracing() is not None:  # --tracing: under a CLIENT span
            return send_traced(self._send_checked, method, url, headers, body)
        return self._send_checked(method, url, headers, body)

    async def _send_checked(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> Response:
        if not self.tls:
            return await self._send(method, url, headers, body)
        try:
            return await self._send(method, url, headers, body)
        except aiohttp.ClientError as exc:
            target = url.split("/", 3)[2] if url.count("/") >= 2 else url
            failure = _tls_failure(exc)
            if failure is not None:
                raise tls_error(self.stage, target, failure) from exc
            if _is_stale(exc):
                # TLS 1.3 checks the client certificate after the client's handshake is
                # done: a refusal usually arrives as a reset, not as a TLS alert. Still a
                # connection error (retried like one), but one that says where to look.
                raise aiohttp.ClientConnectionError(
                    f"TLS connection to the {self.stage} upstream {target} was reset before"
                    f" any answer (an upstream requiring a client certificate it does not"
                    f" accept refuses this way; see --client-cert-file): {exc!r}"
                ) from exc
            raise

    async def fetch(
        self,
        url: str,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        target: str,
        errors: StageErrors,
        limit: int,
        timeout: float | None,  # noqa: ASYNC109 - one bound over sending and reading
    ) -> Answer:
        """POST ``body`` and read the whole answer (at most ``limit`` bytes, within
        ``timeout``). Connection failures and 502/503/504 raise :class:`Retryable`;
        timeouts and broken answers the stage's errors; any other status is returned."""
        who = f"{self.stage} at {target}"
        try:
            async with deadlines.timeout(timeout):
                response = await self.send("POST", url, headers, body)
                try:
                    status = response.status
                    content_type = response.headers.get("Content-Type")
                    answer = await read_bounded(response, limit)
                finally:
                    response.release()
        except TimeoutError as exc:
            if timeout is None:  # not our bound: aiohttp's connect timeout
                raise Retryable(errors.failed(f"{who} unreachable: {exc!r}", "connect")) from None
            raise errors.timeout(f"{who} gave no answer within {timeout:g}s") from None
        except AnswerTooLarge as exc:
            raise errors.failed(f"{who}: {exc}", errors.too_large_reason) from None
        except aiohttp.ClientConnectionError as exc:
            raise Retryable(errors.failed(f"{who} unreachable: {exc!r}", "connect")) from None
        except aiohttp.ClientError as exc:
            raise errors.failed(f"{who}: {exc!r}", "protocol") from None
        if status in RETRYABLE_STATUSES:
            raise Retryable(errors.failed(f"{who} answered {status}", f"status_{status}"))
        return Answer(status, content_type, answer)

    async def open(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
        *,
        first_byte_timeout: float,
        what: str = "model server",
    ) -> tuple[Response, bytes]:
        """Send a leg whose answer is relayed to the client; return once its first body
        bytes (or its end) arrived. Failures become decode errors (``what`` names the
        upstream in them); on success the caller releases the response."""
        response: Response | None = None
        try:
            async with deadlines.timeout(first_byte_timeout):
                response = await self.send(method, url, headers, body)
                first = await response.content.readany()
        except TimeoutError:
            if response is not None:
                response.close()
            raise DecodeTimeout(
                f"{what} gave no first byte within {first_byte_timeout:g}s"
            ) from None
        except aiohttp.ClientConnectorError:
            raise DecodeNotReady() from None
        except aiohttp.ClientError as exc:
            if response is not None:
                response.close()
            raise DecodeError(f"{what} request failed: {exc!r}") from None
        except BaseException:
            if response is not None:
                response.close()
            raise
        return response, first

    async def _send(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> Response:
        try:
            return await self._request(method, url, headers, body)
        except aiohttp.ClientError as exc:
            # A streamed body has been consumed: it cannot be sent twice.
            if not _is_stale(exc) or not (body is None or isinstance(body, bytes)):
                raise
        self._on_stale(self.stage)
        return await self._request(method, url, headers, body)

    def _request(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> Awaitable[Response]:
        """The one place a request goes out; returns once the answer's headers arrived."""
        if self.client is not None:
            return self.client.request(method, url, headers, body)
        return self.session.request(
            method, self._url(url), data=body, headers=headers, allow_redirects=False
        )
