"""Make relayed usage report the prefill's cached tokens, in JSON bodies and SSE streams.

The decode engine reports cached tokens from its own view (vLLM counts only its local
prefix hits), but users bill on the prefill's view, where the prompt was computed.

The SSE rewriter frames the stream in whole events (:mod:`sidecar.sse`) and parses only
events that contain the shape's cached-token key, so ordinary token chunks are
forwarded as the very bytes that arrived.
"""

from __future__ import annotations

from common.json_codec import dumps, loads
from sidecar.api_shapes import ApiShape
from sidecar.sse import EventFramer, first_event_end

__all__ = ["SseUsageRewriter", "rewrite_event", "rewrite_json"]


def rewrite_json(shape: ApiShape, body: bytes, cached: int) -> bytes:
    """The JSON body with its cached-token count replaced, or ``body`` itself if none."""
    if shape.usage_marker not in body:
        return body
    try:
        payload = loads(body)
    except ValueError:
        return body
    return dumps(payload) if shape.write_cached(payload, cached) else body


def rewrite_event(shape: ApiShape, event: bytes, cached: int) -> bytes:
    """One complete SSE event (with its terminating blank line), rewritten if it has usage."""
    lines = event.split(b"\n")
    data_index = -1
    for index, line in enumerate(lines):
        if line.startswith(b"data:"):
            if data_index >= 0:
                return event  # multi-line data: not what vLLM emits, leave it alone
            data_index = index
    if data_index < 0:
        return event
    line = lines[data_index]
    cr = line.endswith(b"\r")
    raw = line[5:-1] if cr else line[5:]
    raw = raw[1:] if raw.startswith(b" ") else raw
    try:
        payload = loads(raw)
    except ValueError:
        return event
    if not shape.write_cached(payload, cached):
        return event
    lines[data_index] = b"data: " + dumps(payload) + (b"\r" if cr else b"")
    return b"\n".join(lines)


class SseUsageRewriter(EventFramer):
    """An :class:`EventFramer` that rewrites the events carrying the shape's usage."""

    __slots__ = ("_cached", "_marker", "_shape")

    def __init__(self, shape: ApiShape, cached: int) -> None:
        super().__init__()
        self._shape = shape
        self._cached = cached
        self._marker = shape.usage_marker

    def events(self, complete: bytes) -> bytes:
        if self._marker not in complete:
            return complete
        return self._rewrite_events(complete)

    def _rewrite_events(self, complete: bytes) -> bytes:
        """Rewrite only the events holding the marker; copy the bytes around them as is."""
        out: list[bytes] = []
        start = 0
        marker = complete.find(self._marker)
        while marker >= 0:
            lf = complete.rfind(b"\n\n", start, marker)
            crlf = complete.rfind(b"\r\n\r\n", start, marker)
            event_start = max(start, lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
            event_end = first_event_end(complete, marker)
            out.append(complete[start:event_start])
            out.append(rewrite_event(self._shape, complete[event_start:event_end], self._cached))
            start = event_end
            marker = complete.find(self._marker, start)
        out.append(complete[start:])
        return b"".join(out)
