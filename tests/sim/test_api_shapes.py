"""Every API shape, JSON and SSE, parsed by the official clients."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from vllm_sim.tokens import chat_prompt, decode_token, output_token_ids, tokenize

PROMPT = "Explain prefill and decode disaggregation in one paragraph, please. " * 3


def client(sim: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="unused", max_retries=0)


def expected_text(prompt_ids: list[int], n: int) -> str:
    return "".join(
        decode_token(t, first=i == 0) for i, t in enumerate(output_token_ids(prompt_ids, n))
    )


async def test_chat_json_usage_and_determinism(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    async with client(sim) as oa:
        messages: Any = [{"role": "user", "content": PROMPT}]
        first = await oa.chat.completions.create(model="sim-model", messages=messages, max_tokens=7)
        second = await oa.chat.completions.create(
            model="sim-model", messages=messages, max_tokens=7
        )
    prompt_ids = tokenize(chat_prompt(messages))
    assert first.choices[0].message.content == expected_text(prompt_ids, 7)
    assert second.choices[0].message.content == first.choices[0].message.content
    assert first.choices[0].finish_reason == "length"
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens == len(prompt_ids)
    assert first.usage.completion_tokens == 7
    assert first.usage.total_tokens == len(prompt_ids) + 7
    assert first.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Repeated prefix: every full block of the prompt is a cache hit the second time.
    assert second.usage.prompt_tokens_details.cached_tokens == len(prompt_ids) // 16 * 16


async def test_chat_stream_with_usage(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    async with client(sim) as oa:
        stream = await oa.chat.completions.create(
            model="sim-model",
            messages=[{"role": "user", "content": PROMPT}],
            max_completion_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    usage = chunks[-1].usage
    assert len(text.split()) == 5
    assert finish == ["length"]
    assert chunks[-1].choices == []
    assert usage is not None and usage.completion_tokens == 5


async def test_natural_stop_and_stop_strings(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True, natural_output_tokens=3)
    async with client(sim) as oa:
        natural = await oa.completions.create(model="sim-model", prompt=PROMPT, max_tokens=50)
        ignored = await oa.completions.create(
            model="sim-model", prompt=PROMPT, max_tokens=6, extra_body={"ignore_eos": True}
        )
        words = natural.choices[0].text.split()
        stopped = await oa.completions.create(
            model="sim-model", prompt=PROMPT, max_tokens=50, stop=[words[1]]
        )
    assert natural.choices[0].finish_reason == "stop"
    assert len(words) == 3
    assert ignored.choices[0].finish_reason == "length"
    assert len(ignored.choices[0].text.split()) == 6
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == words[0]


async def test_completions_stream_and_token_prompt(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    async with client(sim) as oa:
        stream = await oa.completions.create(
            model="sim-model",
            prompt=[5, 6, 7, 8],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected_text([5, 6, 7, 8], 4)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 4


async def test_responses_json_and_stream(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    async with client(sim) as oa:
        resp = await oa.responses.create(model="sim-model", input=PROMPT, max_output_tokens=4)
        again = await oa.responses.create(model="sim-model", input=PROMPT, max_output_tokens=4)
        stream = await oa.responses.create(
            model="sim-model", input=PROMPT, max_output_tokens=4, stream=True
        )
        events = [e async for e in stream]
    assert len(resp.output_text.split()) == 4
    assert resp.status == "incomplete"
    assert resp.usage is not None and again.usage is not None
    assert resp.usage.output_tokens == 4
    assert again.usage.input_tokens_details.cached_tokens > 0
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == resp.output_text
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage is not None
    assert completed.response.usage.input_tokens_details.cached_tokens > 0


async def test_messages_json_and_stream(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    ac = anthropic.AsyncAnthropic(base_url=sim.url, api_key="unused", max_retries=0)
    async with ac:
        msg = await ac.messages.create(
            model="sim-model",
            max_tokens=3,
            system="be brief",
            messages=[{"role": "user", "content": PROMPT}],
        )
        async with ac.messages.stream(
            model="sim-model", max_tokens=3, messages=[{"role": "user", "content": PROMPT}]
        ) as stream:
            streamed = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
    assert msg.stop_reason == "max_tokens"
    assert msg.usage.output_tokens == 3
    assert len(msg.content[0].text.split()) == 3  # type: ignore[union-attr]
    assert streamed == final.content[0].text  # type: ignore[union-attr]
    assert final.usage.output_tokens == 3
    assert final.usage.cache_read_input_tokens is not None


async def test_generate_json_and_stream(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    body = {"token_ids": [11, 12, 13], "sampling_params": {"max_tokens": 3}}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/inference/v1/generate", json=body) as resp:
            payload = await resp.json()
        async with session.post(
            f"{sim.url}/inference/v1/generate", json={**body, "stream": True}
        ) as resp:
            raw = await resp.text()
    assert payload["choices"][0]["token_ids"] == output_token_ids([11, 12, 13], 3)
    assert payload["choices"][0]["finish_reason"] == "length"
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = [t for e in events[:-1] for t in json.loads(e)["choices"][0]["token_ids"]]
    assert streamed == payload["choices"][0]["token_ids"]


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/v1/chat/completions", {"messages": "nope"}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"},
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "min_tokens": 5},
            "min_tokens",
        ),
        ("/v1/completions", {"prompt": "x " * 20, "max_tokens": 10_000}, "context length"),
        ("/v1/messages", {"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ("/inference/v1/generate", {"token_ids": ["a"]}, "token_ids"),
        ("/v1/responses", {"input": 3}, "input"),
    ],
)
async def test_bad_requests_get_400_with_vllm_error_body(
    start_sim: Any, path: str, body: dict[str, Any], fragment: str
) -> None:
    sim = await start_sim(zero_latency=True, max_model_len=512)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}{path}", json=body) as resp:
            payload = await resp.json()
            assert resp.status == 400
    assert fragment in payload["error"]["message"]
    assert payload["error"]["code"] == 400


async def test_not_json_and_unknown_model(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/v1/completions", data=b"{not json") as resp:
            assert resp.status == 400
        async with session.post(
            f"{sim.url}/v1/completions", json={"model": "other", "prompt": "hi"}
        ) as resp:
            assert resp.status == 404
            assert "other" in (await resp.json())["error"]["message"]
    stats = await sim.stats()
    assert stats["errors"] == 2
