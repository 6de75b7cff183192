"""EventFramer: whole events out, the unfinished tail held, oversized events relayed raw."""

from __future__ import annotations

from sidecar.sse import MAX_EVENT_BYTES, EventFramer


def test_complete_events_go_out_and_the_tail_waits_for_its_blank_line() -> None:
    framer = EventFramer()
    assert framer.feed(b"data: 1\n\ndata: ") == b"data: 1\n\n"
    assert framer.feed(b"2\r\n") == b""
    assert framer.feed(b"\r\ndata: 3\n\n") == b"data: 2\r\n\r\ndata: 3\n\n"
    assert framer.flush() == b""


def test_flush_sends_the_tail_and_discard_drops_it() -> None:
    framer = EventFramer()
    assert framer.feed(b"data: [DONE]") == b""
    assert framer.flush() == b"data: [DONE]"
    framer.feed(b'data: {"half')
    framer.discard()
    assert framer.flush() == b""


def test_an_oversized_event_is_relayed_raw_and_framing_resumes_after_it() -> None:
    framer = EventFramer()
    big = b"data: " + b"x" * MAX_EVENT_BYTES
    assert framer.feed(big) == big  # not held: no event is this long
    assert framer.feed(b"yy\n") == b"yy\n"
    # The boundary split across chunks is still seen; after it, whole events again.
    assert framer.feed(b"\ndata: 1\n\ndata: 2") == b"\ndata: 1\n\n"
    assert framer.flush() == b"data: 2"
