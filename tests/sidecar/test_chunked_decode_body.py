"""Chunked decode's pure translation: which requests are chunked, each chunk's body, and
the answer put back together (sidecar.chunked_decode)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.chunked_decode import (
    ChunkAnswerError,
    ChunkedDecode,
    NotChunkable,
    chunking_applies,
    output_budget,
    refuse_unchunkable,
)

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def _answer(
    text: str,
    tokens: int,
    finish: str = "length",
    *,
    prompt: int = 10,
    rid: str = "chatcmpl-x",
    logprobs: list[Any] | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + tokens,
        "completion_tokens": tokens,
    }
    if details is not None:
        usage["prompt_tokens_details"] = details
    return {
        "id": rid,
        "object": "chat.completion",
        "created": 100 if rid == "chatcmpl-1" else 200,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": finish,
                "stop_reason": None,
            }
        ],
        "usage": usage,
    }


def test_budget_prefers_max_completion_tokens() -> None:
    assert output_budget({"max_tokens": 5, "max_completion_tokens": 9}) == 9
    assert output_budget({"max_tokens": 5}) == 5
    assert output_budget({"max_tokens": None}) is None
    assert output_budget({"max_tokens": True}) is None
    assert output_budget({}) is None


@pytest.mark.parametrize(
    ("path", "body", "size", "applies"),
    [
        (CHAT, {"max_tokens": 9}, 8, True),
        (CHAT, {"max_tokens": 8}, 8, False),  # fits in one chunk: unchanged
        (CHAT, {}, 8, True),  # no budget: chunks until the model stops
        (CHAT, {"max_tokens": 100}, 0, False),  # off
        ("/v1/completions", {"max_tokens": 100}, 8, False),  # chat only, as llm-d
        ("/v1/responses", {"max_output_tokens": 100}, 8, False),
    ],
)
def test_which_requests_are_chunked(
    path: str, body: dict[str, Any], size: int, applies: bool
) -> None:
    assert chunking_applies(path, body, size) is applies


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 3}, "n"),
        ({"best_of": 2}, "best_of"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"echo": True}, "echo"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"return_token_ids": True}, "return_token_ids"),
        ({"structured_outputs": {"json": {}}}, "structured_outputs"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"guided_regex": "a+"}, "guided_regex"),
        ({"tools": [{"type": "function"}], "tool_choice": "auto"}, "tools"),
    ],
)
def test_unchunkable_fields_are_named(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(NotChunkable) as caught:
        refuse_unchunkable(CHAT, {"messages": USER, "max_tokens": 50, **extra}, 8)
    assert caught.value.field == param
    assert caught.value.status == 400
    assert caught.value.payload("rid")["error"]["param"] == param


@pytest.mark.parametrize(
    "extra",
    [
        {"n": 1},
        {"response_format": {"type": "text"}},
        {"tools": [{"type": "function"}], "tool_choice": "none"},
        {"logprobs": True, "top_logprobs": 2},
        {"echo": False},
    ],
)
def test_chunkable_requests_pass(extra: dict[str, Any]) -> None:
    refuse_unchunkable(CHAT, {"messages": USER, "max_tokens": 50, **extra}, 8)


def test_nothing_is_refused_when_the_request_is_not_chunked() -> None:
    refuse_unchunkable(CHAT, {"messages": USER, "max_tokens": 8, "n": 4}, 8)
    refuse_unchunkable("/v1/completions", {"prompt": "x", "max_tokens": 80, "echo": True}, 8)


def test_chunk_bodies_carry_the_budget_and_continue_the_assistant_message() -> None:
    base = {
        "messages": USER,
        "max_completion_tokens": 20,
        "min_tokens": 12,
        "stream": True,
        "stream_options": {"include_usage": True},
        "kv_transfer_params": {"do_remote_prefill": True},
        "vllm_xargs": {"kv_transfer_params": {}, "keep": 1},
        "temperature": 0.5,
    }
    state = ChunkedDecode(base, 8)
    first = state.next_body()
    assert first is not None
    assert first["max_tokens"] == first["max_completion_tokens"] == 8
    assert first["min_tokens"] == 8
    assert first["stream"] is False
    assert "stream_options" not in first
    assert first["kv_transfer_params"] == {"do_remote_prefill": True}  # the prefill's KV
    assert "continue_final_message" not in first
    assert first["messages"] == USER

    state.take(_answer("Once upon", 8))
    second = state.next_body()
    assert second is not None
    assert second["min_tokens"] == 4
    assert "kv_transfer_params" not in second
    assert second["vllm_xargs"] == {"keep": 1}
    assert second["messages"] == [*USER, {"role": "assistant", "content": "Once upon"}]
    assert second["continue_final_message"] is True
    assert second["add_generation_prompt"] is False
    assert second["temperature"] == 0.5

    state.take(_answer(" a time", 8))
    third = state.next_body()
    assert third is not None
    assert third["max_tokens"] == third["max_completion_tokens"] == 4  # what is left
    assert third["min_tokens"] == 0
    # One assistant message holds everything generated so far.
    assert third["messages"] == [*USER, {"role": "assistant", "content": "Once upon a time"}]
    state.take(_answer(" there", 4))
    assert state.done
    assert state.next_body() is None
    # The base is never mutated.
    assert base["messages"] == USER
    assert base["stream"] is True


@pytest.mark.parametrize(
    ("content", "continued"),
    [
        ("Sure:", "Sure: one two"),
        ([{"type": "text", "text": "Sure:"}],
         [{"type": "text", "text": "Sure:"}, {"type": "text", "text": " one two"}]),
    ],
)  # fmt: skip
def test_a_client_continuing_its_own_message_keeps_continuing_it(
    content: Any, continued: Any
) -> None:
    messages = [*USER, {"role": "assistant", "content": content}]
    base = {
        "messages": messages,
        "max_tokens": 30,
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    state = ChunkedDecode(base, 8)
    state.next_body()
    state.take(_answer(" one two", 8))
    body = state.next_body()
    assert body is not None
    assert body["messages"] == [*USER, {"role": "assistant", "content": continued}]


@pytest.mark.parametrize(
    ("answers", "chunks", "finish"),
    [
        ([("a", 8, "length"), ("b", 3, "stop")], 2, "stop"),
        ([("a", 8, "length"), ("b", 8, "length"), ("c", 4, "length")], 3, "length"),
        ([("a", 8, "length"), ("", 0, "length")], 2, "length"),  # an empty chunk ends it
        ([("a", 2, "tool_calls")], 1, "tool_calls"),
    ],
)
def test_when_chunking_stops(answers: list[tuple[str, int, str]], chunks: int, finish: str) -> None:
    state = ChunkedDecode({"messages": USER, "max_tokens": 20}, 8)
    pieces = []
    while state.next_body() is not None:
        pieces.append(state.take(_answer(*answers[state.chunks])))
    assert state.chunks == chunks
    assert [p.finish_reason for p in pieces] == [None] * (chunks - 1) + [finish]


def test_no_budget_continues_while_the_model_hits_the_chunk_cap() -> None:
    state = ChunkedDecode({"messages": USER}, 8)
    for _ in range(5):
        body = state.next_body()
        assert body is not None
        assert body["max_tokens"] == 8
        state.take(_answer("x", 8))
    assert not state.done
    state.take(_answer("y", 1, "stop"))
    assert state.done


def test_the_answer_is_one_completion_with_summed_usage() -> None:
    details = {"cached_tokens": 6}
    lp1, lp2 = [{"token": "a", "logprob": -1.0}], [{"token": "b", "logprob": -2.0}]
    state = ChunkedDecode({"messages": USER, "max_tokens": 12, "logprobs": True}, 8)
    state.take(_answer("a", 8, prompt=10, rid="chatcmpl-1", logprobs=lp1, details=details))
    # Chunk 2's prompt holds the generated text too: not the client's prompt.
    state.take(_answer("b", 4, prompt=18, rid="chatcmpl-2", logprobs=lp2))
    answer = state.answer()
    assert answer["id"] == "chatcmpl-1"
    assert answer["created"] == 100
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "ab"}
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] == {"content": lp1 + lp2}
    assert answer["usage"] == {
        "prompt_tokens": 10,
        "total_tokens": 22,
        "completion_tokens": 12,
        "prompt_tokens_details": details,
    }


def _event(data: bytes) -> Any:
    assert data.startswith(b"data: ")
    assert data.endswith(b"\n\n")
    return json.loads(data[len(b"data: ") : -2])


def test_stream_events() -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    base = {"messages": USER, "max_tokens": 12, "stream": True, "stream_options": options}
    state = ChunkedDecode(base, 8)
    assert state.streaming
    first = _event(state.event(state.take(_answer("a", 8, rid="chatcmpl-1"))))
    second = _event(state.event(state.take(_answer("b", 4, "length", rid="chatcmpl-2"))))
    assert first["id"] == second["id"] == "chatcmpl-1"
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    assert first["choices"][0]["finish_reason"] is None
    assert second["choices"][0]["delta"] == {"content": "b"}
    assert second["choices"][0]["finish_reason"] == "length"
    assert first["usage"]["completion_tokens"] == 8  # continuous usage: so far
    assert second["usage"]["completion_tokens"] == 12
    closing = state.usage_event()
    assert closing is not None
    assert _event(closing)["choices"] == []
    assert _event(closing)["usage"]["total_tokens"] == 22


def test_no_usage_event_unless_asked() -> None:
    state = ChunkedDecode({"messages": USER, "max_tokens": 12, "stream": True}, 8)
    event = _event(state.event(state.take(_answer("a", 3, "stop"))))
    assert "usage" not in event
    assert state.usage_event() is None


@pytest.mark.parametrize(
    "answer",
    [
        [],
        {"choices": []},
        {"choices": [{"message": {"content": "x"}, "finish_reason": "length"}]},  # no usage
    ],
)
def test_unusable_chunk_answers_are_refused(answer: Any) -> None:
    state = ChunkedDecode({"messages": USER, "max_tokens": 12}, 8)
    with pytest.raises(ChunkAnswerError):
        state.take(answer)
