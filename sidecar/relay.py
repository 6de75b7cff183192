"""Relay an upstream response body to the client as it arrives, chunk by chunk.

Before the first byte reaches the client, failures are raised (the error boundary turns
them into JSON answers). After it, an SSE stream is ended with an ``event: error`` whose
data carries ``{"error": {...}}`` (what the OpenAI and Anthropic clients raise on); any
other body is cut off by closing the connection, so it can never look complete.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from sidecar.errors import DecodeError, DecodeTimeout, SidecarError
from sidecar.exchange import Exchange
from sidecar.usage import SseUsageRewriter

__all__ = ["StreamBroken", "error_event", "is_event_stream", "relay_body"]


class StreamBroken(ConnectionError):
    """A non-SSE body failed midway; the client connection must be dropped."""


def is_event_stream(response: aiohttp.ClientResponse) -> bool:
    return response.content_type == "text/event-stream"


def error_event(error: SidecarError, request_id: str) -> bytes:
    payload = {"type": "error", **error.payload(request_id)}
    return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"


async def relay_body(
    out: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    first: bytes,
    *,
    ex: Exchange,
    idle_timeout: float,
    rewriter: SseUsageRewriter | None = None,
    sse: bool,
) -> None:
    """Copy ``first`` and then the rest of ``upstream``'s body into the prepared ``out``."""
    loop = asyncio.get_running_loop()
    chunk = first
    failure: SidecarError | None = None
    try:
        async with asyncio.timeout(None) as deadline:
            while chunk:
                data = rewriter.feed(chunk) if rewriter is not None else chunk
                if data:
                    # Errors writing to our own client propagate: the client left.
                    await out.write(data)
                deadline.reschedule(loop.time() + idle_timeout)
                try:
                    chunk = await upstream.content.readany()
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                    failure = DecodeError(f"upstream stream broken: {exc!r}")
                    break
                deadline.reschedule(None)
    except TimeoutError:
        failure = DecodeTimeout(f"upstream stream idle for more than {idle_timeout:g}s")
    if failure is None:
        if rewriter is not None:
            tail = rewriter.flush()
            if tail:
                await out.write(tail)
        await out.write_eof()
        return
    ex.error = failure.message
    ex.status = failure.status
    if not sse:
        raise StreamBroken(failure.message)
    tail = rewriter.flush() if rewriter is not None else b""
    # A blank line first: it ends an event cut in half, and is a no-op otherwise.
    await out.write(tail + b"\n\n" + error_event(failure, ex.request_id))
    await out.write_eof()
