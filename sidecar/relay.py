"""Relay an upstream response body to the client as it arrives, chunk by chunk.

Before the first byte reaches the client, failures are raised (the error boundary turns
them into JSON answers). After it, an SSE stream is ended with an ``event: error`` whose
data carries ``{"error": {...}}`` (what the OpenAI and Anthropic clients raise on); any
other body is cut off by closing the connection, so it can never look complete.

An SSE stream is relayed in whole events: the unfinished tail of the current event is
held back until its blank line arrives. Were half an event relayed and the upstream
then broke, the blank line before the error event would hand the client that half as
an event of its own: broken JSON instead of the error.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from common import deadlines
from sidecar.errors import DecodeError, DecodeTimeout, SidecarError
from sidecar.exchange import Exchange
from sidecar.server import StreamResponse
from sidecar.sse import EventFramer
from sidecar.tracing import usage_watcher
from sidecar.upstream import Response

__all__ = ["StreamBroken", "error_event", "is_event_stream", "relay_body"]


class StreamBroken(ConnectionError):
    """A non-SSE body failed midway; the client connection must be dropped."""


def is_event_stream(response: Response) -> bool:
    return response.content_type == "text/event-stream"


def error_event(error: SidecarError, request_id: str) -> bytes:
    payload = {"type": "error", **error.payload(request_id)}
    return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"


async def relay_body(
    out: StreamResponse,
    upstream: Response,
    first: bytes,
    *,
    ex: Exchange,
    idle_timeout: float,
    rewriter: EventFramer | None = None,
    sse: bool,
) -> None:
    """Copy ``first`` and then the rest of ``upstream``'s body into the prepared ``out``."""
    loop = asyncio.get_running_loop()
    chunk = first
    failure: SidecarError | None = None
    framer = rewriter if rewriter is not None else (EventFramer() if sse else None)
    watch = usage_watcher(sse, upstream.content_type)  # None unless traced
    content = upstream.content
    try:
        async with deadlines.timeout(None) as deadline:
            while chunk:
                data = framer.feed(chunk) if framer is not None else chunk
                if data:
                    if watch is not None:
                        watch.feed(data)
                    # Errors writing to our own client propagate: the client left.
                    await out.write(data)
                try:
                    if content.is_eof():
                        # The rest is already here: no idle timer to arm.
                        chunk = content.read_nowait()
                        continue
                    deadline.reschedule(loop.time() + idle_timeout)
                    chunk = await content.readany()
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                    failure = DecodeError(f"upstream stream broken: {exc!r}")
                    break
                deadline.reschedule(None)
    except TimeoutError:
        failure = DecodeTimeout(f"upstream stream idle for more than {idle_timeout:g}s")
    if failure is None:
        if framer is not None:
            tail = framer.flush()
            if tail:
                if watch is not None:
                    watch.feed(tail)
                await out.write(tail)
        if watch is not None:
            watch.close()
        await out.write_eof()
        return
    ex.error = failure.message
    ex.status = failure.status
    if not sse:
        raise StreamBroken(failure.message)
    if framer is not None:
        framer.discard()  # half an event is garbage to the client
    # A blank line first: a no-op after whole events, it still ends an event relayed
    # raw (one over the framing limit) that was cut in half.
    await out.write(b"\n\n" + error_event(failure, ex.reply_id))
    await out.write_eof()
