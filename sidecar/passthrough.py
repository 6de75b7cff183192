"""Everything that is not P/D: forwarded to the local vLLM untouched, streamed both ways.

The request body is streamed upstream as it arrives (or, for a decode-only generation
request, sent as the bytes already read and checked) and the answer is streamed back
chunk by chunk; only hop-by-hop and routing headers are dropped, and the engine gets our
request id.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from sidecar.exchange import Exchange
from sidecar.headers import REQUEST_ID, request_headers, response_headers
from sidecar.relay import is_event_stream, relay_body
from sidecar.server import Request, StreamResponse
from sidecar.upstream import Response, Upstream

__all__ = ["passthrough"]


async def passthrough(
    request: Request,
    upstream: Upstream,
    base_url: str,
    ex: Exchange,
    *,
    first_byte_timeout: float,
    idle_timeout: float,
    read: bytes | None = None,
    rewritten: bool = False,
) -> StreamResponse:
    """Forward ``request``; ``read`` is its body when the caller has already read it
    (``rewritten``: a JSON body the caller changed, so its length and encoding differ)."""
    headers = request_headers(request.headers, body_rewritten=rewritten)
    if rewritten:
        headers["Content-Type"] = "application/json"
    headers[REQUEST_ID] = ex.request_id  # the engine's id: ours, never the client's
    body: AsyncIterator[bytes] | bytes | None = read
    if body is None and request.body_exists:
        body = request.content.iter_any()
    url = base_url + request.raw_path
    started = time.perf_counter()
    response: Response | None = None
    complete = False
    try:
        response, first = await upstream.open(
            request.method, url, headers, body, first_byte_timeout=first_byte_timeout
        )
        ex.decode_wait_s = time.perf_counter() - started
        out_headers = response_headers(response.headers)
        out_headers[REQUEST_ID] = ex.reply_id
        out = StreamResponse(status=response.status, reason=response.reason, headers=out_headers)
        if response.content_length is not None:
            out.content_length = response.content_length
        await out.prepare(request)
        ex.first_byte()
        await relay_body(
            out,
            response,
            first,
            ex=ex,
            idle_timeout=idle_timeout,
            sse=is_event_stream(response),
        )
        complete = True
        return out
    finally:
        if response is not None:
            if complete:
                response.release()
            else:
                response.close()
