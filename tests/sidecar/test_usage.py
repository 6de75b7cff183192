"""Usage rewrite: JSON bodies and SSE streams cut at arbitrary chunk boundaries."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.api_shapes import API_SHAPES
from sidecar.usage import SseUsageRewriter, rewrite_json

CHAT = API_SHAPES["/v1/chat/completions"]
RESPONSES = API_SHAPES["/v1/responses"]
MESSAGES = API_SHAPES["/v1/messages"]


def _event(payload: Any, event: str | None = None, newline: str = "\n") -> bytes:
    head = f"event: {event}{newline}" if event else ""
    return (head + "data: " + json.dumps(payload) + newline + newline).encode()


def _chat_stream(texts: list[str], cached: int, newline: str) -> bytes:
    parts = [_event({"choices": [{"delta": {"content": t}}]}, newline=newline) for t in texts]
    usage = {"prompt_tokens": 99, "prompt_tokens_details": {"cached_tokens": cached}}
    parts.append(_event({"choices": [], "usage": usage}, newline=newline))
    parts.append(f"data: [DONE]{newline}{newline}".encode())
    return b"".join(parts)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


def _run(rewriter: SseUsageRewriter, pieces: list[bytes]) -> bytes:
    return b"".join(rewriter.feed(piece) for piece in pieces) + rewriter.flush()


def _events(stream: bytes, newline: str) -> list[bytes]:
    return [e for e in stream.split((newline * 2).encode()) if e]


@settings(max_examples=300, deadline=None)
@given(
    texts=st.lists(st.text(max_size=30), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
    decode_cached=st.integers(min_value=0, max_value=10**6),
    prefill_cached=st.integers(min_value=0, max_value=10**6),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_sse_rewrite_any_chunking(
    texts: list[str], cuts: list[int], decode_cached: int, prefill_cached: int, newline: str
) -> None:
    stream = _chat_stream(texts, decode_cached, newline)
    out = _run(SseUsageRewriter(CHAT, prefill_cached), _split(stream, cuts))
    before, after = _events(stream, newline), _events(out, newline)
    assert len(before) == len(after)
    for original, relayed in zip(before, after, strict=True):
        if b'"usage"' in original:
            data = json.loads(relayed.split(b"data: ", 1)[1])
            assert data["usage"]["prompt_tokens_details"]["cached_tokens"] == prefill_cached
            assert data["usage"]["prompt_tokens"] == 99
        else:
            assert relayed == original  # token chunks pass byte for byte
    # Chunking never changes the result.
    assert out == _run(SseUsageRewriter(CHAT, prefill_cached), [stream])


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=5_000), max_size=30))
def test_complete_events_are_released_immediately(cuts: list[int]) -> None:
    stream = _chat_stream(["a", "b", "c"], 5, "\n")
    rewriter = SseUsageRewriter(CHAT, 1)
    sent, fed = b"", 0
    for piece in _split(stream, cuts):
        sent += rewriter.feed(piece)
        fed += len(piece)
        # Every event complete on arrival has been released; only a tail is held back.
        assert sent.count(b"\n\n") == stream[:fed].count(b"\n\n")
    assert sent + rewriter.flush() == _run(SseUsageRewriter(CHAT, 1), [stream])


def test_responses_completed_event() -> None:
    completed = {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 8}}},
    }
    stream = _event({"type": "response.created", "response": {"usage": None}}, "response.created")
    stream += _event(completed, "response.completed")
    out = _run(SseUsageRewriter(RESPONSES, 3), _split(stream, [5, 50, 77]))
    last = json.loads(out.split(b"data: ")[-1])
    assert last["response"]["usage"]["input_tokens_details"]["cached_tokens"] == 3
    assert out.startswith(stream.split(b"\n\n")[0])


def test_messages_start_and_delta() -> None:
    # Anthropic's input_tokens excludes cache reads (vLLM: prompt - cached): 9 tokens,
    # 8 of them cached on the decode engine; the prefill's view is 0 cached.
    start_usage = {"input_tokens": 1, "output_tokens": 0, "cache_read_input_tokens": 8}
    start = {"type": "message_start", "message": {"usage": start_usage}}
    delta_usage = {"input_tokens": 1, "output_tokens": 2, "cache_read_input_tokens": 8}
    delta = {"type": "message_delta", "usage": delta_usage}
    stream = _event(start, "message_start") + _event(delta, "message_delta")
    out = _run(SseUsageRewriter(MESSAGES, 0), [stream])
    payloads = [json.loads(line[6:]) for line in out.split(b"\n") if line.startswith(b"data: ")]
    assert payloads[0]["message"]["usage"]["cache_read_input_tokens"] == 0
    assert payloads[0]["message"]["usage"]["input_tokens"] == 9
    assert payloads[1]["usage"]["cache_read_input_tokens"] == 0
    assert payloads[1]["usage"]["input_tokens"] == 9


def test_messages_usage_without_cache_fields_gets_them() -> None:
    # A decode engine without --enable-prompt-tokens-details: no cache_read at all and
    # input_tokens is the whole prompt; the prefill found 5 of its 9 tokens cached.
    delta = {"type": "message_delta", "usage": {"input_tokens": 9, "output_tokens": 2}}
    out = _run(SseUsageRewriter(MESSAGES, 5), [_event(delta, "message_delta")])
    usage = json.loads(out.split(b"data: ")[1])["usage"]
    assert usage == {"input_tokens": 4, "output_tokens": 2, "cache_read_input_tokens": 5}


def test_json_rewrite() -> None:
    body = json.dumps(
        {"usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 8}}}
    ).encode()
    assert json.loads(rewrite_json(CHAT, body, 2))["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 2
    }
    # vLLM leaves the details out (no --enable-prompt-tokens-details) or null: added.
    for details in (b', "prompt_tokens_details": null', b""):
        bare = b'{"usage": {"prompt_tokens": 9' + details + b"}}"
        assert json.loads(rewrite_json(CHAT, bare, 2))["usage"] == {
            "prompt_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 2},
        }
    untouched = b'{"id": "x", "usage": null}'
    assert rewrite_json(CHAT, untouched, 2) is untouched
    assert rewrite_json(CHAT, b"not json prompt_tokens", 2) == b"not json prompt_tokens"
    anthropic = b'{"usage": {"input_tokens": 1, "cache_read_input_tokens": 8}}'
    usage = json.loads(rewrite_json(MESSAGES, anthropic, 1))["usage"]
    assert usage == {"input_tokens": 8, "cache_read_input_tokens": 1}


def test_oversized_event_is_relayed_raw() -> None:
    big = b"data: " + b"x" * (2 << 20) + b"\n\n"
    usage = _event({"usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 7}}})
    rewriter = SseUsageRewriter(CHAT, 1)
    pieces = [big[:1000], big[1000 : 1 << 21], big[1 << 21 :] + usage]
    out = _run(rewriter, pieces)
    assert out.startswith(big)
    assert json.loads(out[len(big) + 6 :])["usage"]["prompt_tokens_details"]["cached_tokens"] == 1


def test_json_codec_accepts_what_the_standard_library_accepts() -> None:
    from common.json_codec import dumps, loads

    huge = {"seed": 2**70, "text": "héllo"}
    assert loads(dumps(huge)) == huge
    assert (
        loads(b'{"seed": 123456789012345678901234567890}')["seed"] == 123456789012345678901234567890
    )
    assert dumps({"a": "é"}) == '{"a":"é"}'.encode()
