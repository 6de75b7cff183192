"""The pure decisions behind decode-first attempts and the encode stage."""

from __future__ import annotations

import pytest

from sidecar.decode_first import FinishScan, Verdict
from sidecar.encode import encode_request_body, merge_transfer_params, multimodal_items
from sidecar.errors import EncodeError

DECLINED_JSON = b'{"choices": [{"index": 0, "finish_reason": "cache_threshold"}]}'


def test_json_answer_is_judged_at_its_end() -> None:
    scan = FinishScan("cache_threshold", sse=False)
    assert scan.feed(DECLINED_JSON[:20]) is Verdict.PENDING
    assert scan.feed(DECLINED_JSON[20:]) is Verdict.PENDING
    assert scan.end() is Verdict.DECLINED
    accepted = FinishScan("cache_threshold", sse=False)
    accepted.feed(b'{"choices": [{"finish_reason": "length"}]}')
    assert accepted.end() is Verdict.ACCEPTED
    broken = FinishScan("cache_threshold", sse=False)
    broken.feed(b"{not json")
    assert broken.end() is Verdict.ACCEPTED


@pytest.mark.parametrize(
    ("events", "verdict"),
    [
        ([b'data: {"choices": [{"delta": {"role": "assistant"}, "finish_reason": null}]}',
          b'data: {"choices": [{"delta": {}, "finish_reason": "cache_threshold"}]}'],
         Verdict.DECLINED),
        ([b'data: {"choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]}'],
         Verdict.ACCEPTED),
        ([b'data: {"choices": [{"text": "Hi", "finish_reason": null}]}'], Verdict.ACCEPTED),
        ([b"data: [DONE]"], Verdict.ACCEPTED),
    ],
)  # fmt: skip
def test_sse_answer_is_judged_event_by_event(events: list[bytes], verdict: Verdict) -> None:
    scan = FinishScan("cache_threshold", sse=True)
    stream = b"\n\n".join(events) + b"\n\n"
    results = [scan.feed(stream[i : i + 7]) for i in range(0, len(stream), 7)]
    assert results[-1] is verdict
    assert set(results[:-1]) <= {Verdict.PENDING}  # decided by the last event only


def test_undecided_stream_is_accepted_past_the_limit() -> None:
    scan = FinishScan("cache_threshold", sse=True, limit=100)
    assert scan.feed(b'data: {"type": "ping"}\n\n') is Verdict.PENDING
    assert scan.feed(b": comment " * 20) is Verdict.ACCEPTED


def test_multimodal_items_distinct_in_order() -> None:
    cat = {"type": "image_url", "image_url": {"url": "u1"}}
    body = {
        "messages": [
            {"role": "system", "content": "text only"},
            {"role": "user", "content": [
                {"type": "text", "text": "x"}, cat,
                {"type": "audio_url", "audio_url": {"url": "a1"}},
            ]},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "u1", "detail": "high"}},
                {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}},
                {"type": "video_url", "video_url": "v1"},
            ]},
        ]
    }  # fmt: skip
    items = multimodal_items(body)
    assert [i["type"] for i in items] == ["image_url", "audio_url", "input_audio", "video_url"]
    assert items[0] is cat
    assert multimodal_items({"prompt": "x"}) == []
    assert multimodal_items({"messages": "bad"}) == []
    request = encode_request_body({"model": "m", "messages": [], "stream": True}, cat)
    assert request == {
        "messages": [{"role": "user", "content": [cat]}], "max_tokens": 1, "stream": False,
        "model": "m",
    }  # fmt: skip


def test_merge_transfer_params() -> None:
    a = {"h1": {"peer_port": 1}}
    assert merge_transfer_params([a, {"h2": {"peer_port": 2}}, dict(a)]) == {
        "h1": {"peer_port": 1}, "h2": {"peer_port": 2},
    }  # fmt: skip
    with pytest.raises(EncodeError, match="h1") as info:
        merge_transfer_params([a, {"h1": {"peer_port": 3}}])
    assert info.value.stage == "encode" and info.value.status == 502
