"""Client side of each stage: one session and pool per stage, and the stale-connection rule.

vLLM (uvicorn) closes idle keep-alive connections after 5 s, so pools keep theirs for
less; a pooled connection the server closed anyway is detected on use
(``ServerDisconnectedError`` before any response byte) and the request is sent once more
on a fresh connection. Only whole in-memory bodies are resent.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Callable

import aiohttp
from multidict import CIMultiDict

__all__ = ["Upstream", "make_session"]


def make_session(
    *, limit: int, keepalive_timeout: float, connect_timeout: float, decompress: bool
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=limit,
        limit_per_host=0,
        keepalive_timeout=keepalive_timeout,
        ttl_dns_cache=10,
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


class Upstream:
    """One stage's session plus the one transparent resend on a stale pooled connection."""

    def __init__(
        self, stage: str, session: aiohttp.ClientSession, on_stale: Callable[[str], None]
    ) -> None:
        self.stage = stage
        self.session = session
        self._on_stale = on_stale

    async def send(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> aiohttp.ClientResponse:
        """Send and return once response headers arrived; the caller releases the response."""
        try:
            return await self.session.request(
                method, url, data=body, headers=headers, allow_redirects=False
            )
        except aiohttp.ClientError as exc:
            # A streamed body has been consumed: it cannot be sent twice.
            if not _is_stale(exc) or not (body is None or isinstance(body, bytes)):
                raise
        self._on_stale(self.stage)
        return await self.session.request(
            method, url, data=body, headers=headers, allow_redirects=False
        )
