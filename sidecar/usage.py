"""Make relayed usage report the prefill's cached tokens, in JSON bodies and SSE streams.

The decode engine counts the pulled KV as cached, but users bill on the prefill's view.
The SSE rewriter relays every complete event the moment it is complete; it holds back
only the unfinished tail of the current event (useless to a client until it ends) and
parses only events that contain the shape's cached-token key, so ordinary token chunks
are forwarded as the very bytes that arrived.
"""

from __future__ import annotations

from sidecar._json import dumps, loads
from sidecar.api_shapes import ApiShape

__all__ = ["SseUsageRewriter", "last_event_end", "rewrite_event", "rewrite_json"]

_MAX_HELD = 1 << 20  # an event this long is not a usage event: stop holding it back


def rewrite_json(shape: ApiShape, body: bytes, cached: int) -> bytes:
    """The JSON body with its cached-token count replaced, or ``body`` itself if none."""
    if not shape.cached_marker or shape.cached_marker not in body:
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


def last_event_end(data: bytes) -> int:
    """End offset of the last blank line (event boundary) in ``data``; 0 if none."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _first_boundary_end(data: bytes, start: int) -> int:
    lf = data.find(b"\n\n", start)
    crlf = data.find(b"\r\n\r\n", start)
    ends = [pos + 2 for pos in (lf,) if pos >= 0] + [pos + 4 for pos in (crlf,) if pos >= 0]
    return min(ends) if ends else -1


class SseUsageRewriter:
    """Feed upstream chunks in order; emit what :meth:`feed` returns, then :meth:`flush`."""

    __slots__ = ("_cached", "_carry", "_held", "_marker", "_shape", "_skipping")

    def __init__(self, shape: ApiShape, cached: int) -> None:
        self._shape = shape
        self._cached = cached
        self._marker = shape.cached_marker
        self._held = b""
        self._skipping = False  # inside an oversized event, relaying it raw
        self._carry = b""  # last bytes relayed while skipping, to see a split boundary

    def feed(self, chunk: bytes) -> bytes:
        if self._skipping:
            window = self._carry + chunk
            end = _first_boundary_end(window, 0)
            if end < 0:
                self._carry = window[-3:]
                return chunk
            self._skipping = False
            self._carry = b""
            split = end - (len(window) - len(chunk))
            return chunk[:split] + self.feed(chunk[split:])
        data = self._held + chunk if self._held else chunk
        end = last_event_end(data)
        if end == 0:
            if len(data) > _MAX_HELD:
                self._held = b""
                self._skipping = True
                self._carry = data[-3:]
                return data
            self._held = data
            return b""
        self._held = data[end:]
        complete = data if end == len(data) else data[:end]
        if self._marker not in complete:
            return complete
        return self._rewrite_events(complete)

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held

    def discard(self) -> None:
        """The stream broke: the unfinished event is never sent."""
        self._held = b""

    def _rewrite_events(self, complete: bytes) -> bytes:
        """Rewrite only the events holding the marker; copy the bytes around them as is."""
        out: list[bytes] = []
        start = 0
        marker = complete.find(self._marker)
        while marker >= 0:
            lf = complete.rfind(b"\n\n", start, marker)
            crlf = complete.rfind(b"\r\n\r\n", start, marker)
            event_start = max(start, lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
            event_end = _first_boundary_end(complete, marker)
            out.append(complete[start:event_start])
            out.append(rewrite_event(self._shape, complete[event_start:event_end], self._cached))
            start = event_end
            marker = complete.find(self._marker, start)
        out.append(complete[start:])
        return b"".join(out)
