"""Server-sent events passed on in whole events: the framing the relay and the usage
rewriter share.

Every complete event goes out the moment its blank line arrives; only the unfinished
tail of the current event is held back (useless to a client until it ends, and garbage
if the stream then breaks). A run of more than :data:`MAX_EVENT_BYTES` without an event
boundary is not an event worth holding: it goes out as it comes, and framing resumes
after the boundary that ends it.
"""

from __future__ import annotations

__all__ = ["MAX_EVENT_BYTES", "EventFramer", "first_event_end", "last_event_end"]

MAX_EVENT_BYTES = 1 << 20


def last_event_end(data: bytes) -> int:
    """End offset of the last blank line (event boundary) in ``data``; 0 if none."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def first_event_end(data: bytes, start: int = 0) -> int:
    """End offset of the first blank line at or after ``start``; -1 if none."""
    lf = data.find(b"\n\n", start)
    crlf = data.find(b"\r\n\r\n", start)
    ends = [pos + 2 for pos in (lf,) if pos >= 0] + [pos + 4 for pos in (crlf,) if pos >= 0]
    return min(ends) if ends else -1


class EventFramer:
    """Feed upstream chunks in order; send what :meth:`feed` returns, then :meth:`flush`
    at the end of the stream, or :meth:`discard` when it breaks.

    Subclasses see each run of complete events in :meth:`events` and may rewrite it.
    """

    __slots__ = ("_carry", "_held", "_skipping")

    def __init__(self) -> None:
        self._held = b""
        self._skipping = False  # inside an oversized event, relaying it raw
        self._carry = b""  # last bytes relayed while skipping, to see a split boundary

    def feed(self, chunk: bytes) -> bytes:
        if self._skipping:
            window = self._carry + chunk
            end = first_event_end(window)
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
            if len(data) > MAX_EVENT_BYTES:
                self._held = b""
                self._skipping = True
                self._carry = data[-3:]
                return data
            self._held = data
            return b""
        self._held = data[end:]
        return self.events(data if end == len(data) else data[:end])

    def events(self, complete: bytes) -> bytes:
        """One or more complete events on their way out, as they will be sent."""
        return complete

    def flush(self) -> bytes:
        """The stream ended: whatever is held goes out as it is."""
        held, self._held = self._held, b""
        return held

    def discard(self) -> None:
        """The stream broke: the unfinished event is never sent."""
        self._held = b""
