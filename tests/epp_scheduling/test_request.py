"""Request parsing for the five API shapes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.decision import BadRequest
from epp.request import CHARS_PER_TOKEN, parse_request, supported_paths


def parse(path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(path, headers or {}, raw)


def test_chat_text_and_token_estimate() -> None:
    req = parse(
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "x" * 400},
            ],
        },
    )
    assert req.api == "chat"
    assert req.model == "m"
    assert b"be brief" in req.prompt
    assert b"x" * 400 in req.prompt
    assert req.token_estimate == -(-len(req.prompt) // CHARS_PER_TOKEN)
    assert req.token_estimate >= 100
    assert req.multimodal == []


def test_chat_prefix_is_stable_when_a_turn_is_appended() -> None:
    first = parse(
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "question one"}]},
    )
    second = parse(
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "question one"},
                {"role": "assistant", "content": "answer"},
                {"role": "user", "content": "question two"},
            ],
        },
    )
    assert second.prompt.startswith(first.prompt)


def test_chat_multimodal_items_deduplicated_in_order() -> None:
    req = parse(
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "describe"},
                        {"type": "image_url", "image_url": {"url": "http://img/1.png"}},
                        {"type": "audio_url", "audio_url": {"url": "http://a/1.wav"}},
                        {"type": "video_url", "video_url": {"url": "http://v/1.mp4"}},
                        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                        {"type": "image_url", "image_url": {"url": "http://img/1.png"}},
                    ],
                }
            ],
        },
    )
    kinds = [item.kind for item in req.multimodal]
    assert kinds == ["image_url", "audio_url", "video_url", "input_audio"]
    assert req.multimodal[0].key == "http://img/1.png"
    assert req.multimodal[3].key.startswith("sha256:")


def test_completions_string_list_and_token_ids() -> None:
    assert parse("/v1/completions", {"model": "m", "prompt": "abc"}).prompt == b"abc"
    assert parse("/v1/completions", {"model": "m", "prompt": ["ab", "cd"]}).prompt == b"abcd"
    ids = parse("/v1/completions", {"model": "m", "prompt": [1, 2, 3]})
    assert ids.token_estimate == 3
    nested = parse("/v1/completions", {"model": "m", "prompt": [[1, 2], [3]]})
    assert nested.token_estimate == 3
    assert nested.prompt == ids.prompt


def test_responses_string_and_items() -> None:
    simple = parse("/v1/responses", {"model": "m", "input": "hi", "instructions": "sys"})
    assert b"sys" in simple.prompt and b"hi" in simple.prompt
    items = parse(
        "/v1/responses",
        {
            "model": "m",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "look"},
                        {"type": "input_image", "image_url": "http://img/2.png"},
                    ],
                },
                {"type": "function_call_output", "call_id": "c", "output": "42"},
            ],
        },
    )
    assert b"look" in items.prompt and b"42" in items.prompt
    assert [i.key for i in items.multimodal] == ["http://img/2.png"]


def test_anthropic_messages() -> None:
    req = parse(
        "/v1/messages",
        {
            "model": "m",
            "max_tokens": 5,
            "system": "sys",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hello"},
                        {"type": "image", "source": {"type": "url", "url": "http://i/3"}},
                    ],
                }
            ],
        },
    )
    assert req.api == "messages"
    assert b"sys" in req.prompt and b"hello" in req.prompt
    assert [i.key for i in req.multimodal] == ["http://i/3"]


def test_generate_token_ids_model_optional() -> None:
    req = parse(
        "/inference/v1/generate", {"token_ids": [5, 6, 7, 8], "sampling_params": {"max_tokens": 3}}
    )
    assert req.api == "generate"
    assert req.model == ""
    assert req.token_estimate == 4


def test_stream_and_request_id() -> None:
    req = parse(
        "/v1/chat/completions?x=1",
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "a"}]},
        {"x-request-id": "rid-1"},
    )
    assert req.stream is True
    assert req.path == "/v1/chat/completions"
    assert req.request_id == "rid-1"


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/chat/completions", b"{not json", "not valid JSON"),
        ("/v1/chat/completions", b"", "empty"),
        ("/v1/chat/completions", b"[1, 2]", "JSON object"),
        ("/v1/chat/completions", b'{"messages": []}', "'model'"),
        ("/v1/chat/completions", b'{"model": 3, "messages": []}', "'model' must be a string"),
        ("/v1/chat/completions", b'{"model": "m"}', "'messages'"),
        ("/v1/chat/completions", b'{"model": "m", "messages": "x"}', "must be a list"),
        (
            "/v1/chat/completions",
            b'{"model": "m", "messages": [{"role": "u", "content": 5}]}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "m", "messages": [{"role": "u", "content": [{"type": "image_url"}]}]}',
            "image_url.url",
        ),
        ("/v1/completions", b'{"model": "m", "prompt": {"a": 1}}', "'prompt'"),
        ("/v1/completions", b'{"model": "m", "prompt": [1, "a"]}', "token ids"),
        ("/v1/responses", b'{"model": "m"}', "'input'"),
        ("/inference/v1/generate", b'{"token_ids": "abc"}', "token_ids"),
        ("/v1/embeddings", b'{"model": "m"}', "unsupported path"),
        ("/v1/chat/completions", b"\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_requests_are_bad_requests(path: str, body: bytes, needle: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(path, {}, body)
    assert info.value.status == 400
    assert needle in info.value.message


def test_supported_paths() -> None:
    assert set(supported_paths()) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
        "/inference/v1/generate",
    }


def test_large_body_parses_quickly() -> None:
    # Not a benchmark: a generous bound that only a per-character Python loop would miss.
    text = "lorem ipsum dolor sit amet " * 8000  # ~216 KB
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
    t0 = time.perf_counter()
    req = parse_request("/v1/chat/completions", {}, body)
    assert time.perf_counter() - t0 < 0.5
    assert req.token_estimate > 50_000


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "text",
                    "content",
                    "role",
                    "image_url",
                    "url",
                    "input_audio",
                    "data",
                    "source",
                    "messages",
                    "prompt",
                    "input",
                    "token_ids",
                    "model",
                    "system",
                    "instructions",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(path=st.sampled_from(list(supported_paths())), doc=_json)
def test_any_json_parses_or_is_a_bad_request(path: str, doc: Any) -> None:
    try:
        parse_request(path, {}, json.dumps(doc).encode())
    except BadRequest as exc:
        assert exc.message


@settings(max_examples=150, deadline=None)
@given(
    path=st.sampled_from(list(supported_paths())),
    doc=st.fixed_dictionaries(
        {"model": st.just("m")},
        optional={k: _json for k in ("messages", "prompt", "input", "token_ids", "system")},
    ),
)
def test_shaped_json_parses_or_is_a_bad_request(path: str, doc: dict[str, Any]) -> None:
    try:
        req = parse_request(path, {}, json.dumps(doc).encode())
    except BadRequest as exc:
        assert exc.message
    else:
        assert req.token_estimate >= 0


def test_deeply_nested_body_is_a_bad_request() -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(BadRequest, match="nests too deeply"):
        parse_request("/v1/chat/completions", {}, body)


def test_token_id_checks() -> None:
    from epp.request import is_token_ids

    assert is_token_ids([1, 2, 3])
    assert not is_token_ids([]) and not is_token_ids([1, True]) and not is_token_ids("12")
    assert not is_token_ids([1, 2.0])
    long = list(range(1000))
    assert is_token_ids(long) and is_token_ids([*long, 2**53, 2**70])
    assert not is_token_ids([*long, True]) and not is_token_ids([*long, False])
    assert not is_token_ids([*long, None]) and not is_token_ids([*long, [1]])
    assert not is_token_ids([*long, "1"]) and not is_token_ids([*long, 1e300])


def test_token_id_prompt_bytes_are_made_on_first_read_and_unchanged() -> None:
    from array import array

    ids = [1, 2, 70_000, 2**40, -3]
    req = parse("/v1/completions", {"model": "m", "prompt": ids})
    assert req.prompt_source is req.body["prompt"]  # not built at parse time
    expected = array("q", ids).tobytes().hex().encode()
    assert req.prompt == expected
    assert req.prompt_source == expected and req.prompt is req.prompt  # built once
    generate = parse("/inference/v1/generate", {"token_ids": ids})
    assert generate.prompt == expected
    # Text prompts are bytes from the start.
    assert parse("/v1/completions", {"model": "m", "prompt": "abc"}).prompt_source == b"abc"


def test_client_token_ids_are_checked_once() -> None:
    ids = list(range(100))
    req = parse("/v1/completions", {"model": "m", "prompt": ids})
    got = req.client_token_ids()
    assert got == ids and got is req.body["prompt"]
    req.body["prompt"].append(True)  # a second check would now refuse the list
    assert req.client_token_ids() is got
    with_bool = parse("/v1/completions", {"model": "m", "prompt": [1, True]})
    assert with_bool.client_token_ids() is None and with_bool.token_estimate == 2
    assert parse("/v1/completions", {"model": "m", "prompt": "abc"}).client_token_ids() is None
    assert parse("/v1/chat/completions", {"model": "m", "messages": []}).client_token_ids() is None


def test_large_token_id_bodies_are_checked_once_and_packed_on_first_read() -> None:
    from array import array

    ids = [i * 7 % 150_000 for i in range(64 * 1024 // 3)]
    ids[5] = 2**53 - 1  # the widest ids whose packing waits
    ids[6] = -(2**53 - 1)
    req = parse("/v1/completions", {"model": "m", "prompt": ids, "stream": True})
    assert req.token_estimate == len(ids)
    # Read packed (a long body): the ids are an array of 64-bit ints from the start.
    assert isinstance(req.body["prompt"], array) and req.body["prompt"].tolist() == ids
    assert req.prompt_source is req.body["prompt"]
    assert req.client_token_ids() is req.body["prompt"]  # known from the parse
    assert req.prompt == array("q", ids).tobytes().hex().encode()
    # Wider ids, or bools, take the checking path (and are refused, packed or kept).
    for big in (2**63, 2**64, -(2**63) - 1, 10**30):
        with pytest.raises(BadRequest, match="token ids"):
            parse("/v1/completions", {"model": "m", "prompt": [*ids[:-1], big]})
    for wide in (2**53, 10**18 - 1, 2**63 - 1, -(2**63)):
        packed = parse("/v1/completions", {"model": "m", "prompt": [*ids[:-1], wide]})
        assert packed.prompt == array("q", [*ids[:-1], wide]).tobytes().hex().encode()
        assert list(packed.client_token_ids() or ()) == [*ids[:-1], wide]
    # Exact integers beyond 64 bits elsewhere in the body, and floats, stay as sent.
    doc = {"model": "m", "prompt": ids, "seed": 10**25, "temperature": 0.7, "x": [1e300]}
    mixed = parse("/v1/completions", doc)
    assert {**mixed.body, "prompt": list(mixed.body["prompt"])} == doc
    assert type(mixed.body["seed"]) is int
    assert list(mixed.client_token_ids() or ()) == ids and mixed.prompt == req.prompt
    with pytest.raises(BadRequest, match="token ids"):
        parse("/v1/completions", {"model": "m", "prompt": [*ids[:-1], 5.0]})
    with_bool = parse("/v1/completions", {"model": "m", "prompt": [*ids[:-1], True]})
    assert with_bool.client_token_ids() is None
    assert with_bool.prompt == array("q", [*ids[:-1], 1]).tobytes().hex().encode()
    nested = parse("/v1/completions", {"model": "m", "prompt": [ids[:100], ids[100:]]})
    assert nested.prompt == req.prompt and nested.client_token_ids() is None
