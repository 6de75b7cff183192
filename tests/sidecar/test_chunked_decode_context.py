"""Chunked decode at the model's context length, against the simulator enforcing its
``max_model_len`` as vLLM does: a chat request with no ``max_tokens`` ends as unchunked
vLLM ends it, ``finish_reason: "length"`` with the text so far, in JSON and in SSE."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from sidecar.chunked_decode import context_room, is_context_refusal
from tests.sidecar.conftest import StartSidecar
from tests.sidecar.test_chunked_decode import front_factory

__all__ = ["front_factory"]  # the fixture

CHAT = "/v1/chat/completions"
MAX_MODEL_LEN = 96
CHUNK = 16
BODY = {
    "model": "sim-model",
    "messages": [{"role": "user", "content": "tell me a long story about context windows"}],
}


def events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for block in raw.decode().split("\n\n"):
        block = block.strip()
        assert not block.startswith("event: error"), block
        if block.startswith("data: ") and block != "data: [DONE]":
            out.append(json.loads(block[len("data: ") :]))
    return out


async def test_an_unbudgeted_answer_ends_with_length_at_the_context_limit(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    sim = await start_sim(zero_latency=True, max_model_len=MAX_MODEL_LEN)
    sidecar = await start_sidecar(model_server_port=sim.port, decode_chunk_size=CHUNK)

    # Unchunked, straight to the engine: it runs to the end of the context.
    async with client.post(sim.url + CHAT, json=BODY) as r:
        assert r.status == 200
        direct = await r.json()
    assert direct["choices"][0]["finish_reason"] == "length"
    prompt = direct["usage"]["prompt_tokens"]
    assert direct["usage"]["completion_tokens"] == MAX_MODEL_LEN - prompt
    assert MAX_MODEL_LEN - prompt > 2 * CHUNK  # several chunks, the last one capped
    # vLLM's wording for a budget over the room left.
    async with client.post(sim.url + CHAT, json={**BODY, "max_tokens": MAX_MODEL_LEN}) as r:
        assert r.status == 400
        refusal = (await r.json())["error"]["message"]
    assert refusal == (
        f"'max_tokens' or 'max_completion_tokens' is too large: {MAX_MODEL_LEN}. This model's"
        f" maximum context length is {MAX_MODEL_LEN} tokens and your request has {prompt}"
        f" input tokens ({MAX_MODEL_LEN} > {MAX_MODEL_LEN} - {prompt})."
    )

    async with client.post(sidecar.url + CHAT, json=BODY) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"]
    usage = answer["usage"]
    assert usage["prompt_tokens"] == prompt
    # As many tokens as unchunked: the refused chunk was sent again, capped to the room.
    assert usage["completion_tokens"] == direct["usage"]["completion_tokens"]
    sent = [r["body"]["max_tokens"] for r in (await sim.stats())["recorded"][2:]]
    room = MAX_MODEL_LEN - prompt
    full = room // CHUNK
    assert sent == [CHUNK] * (full + 1) + [room - full * CHUNK]

    async with client.post(
        sidecar.url + CHAT,
        json={**BODY, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status == 200
        assert r.content_type == "text/event-stream"
        raw = await r.read()
    assert raw.rstrip().endswith(b"data: [DONE]")
    got = events(raw)
    finishes = [c["finish_reason"] for e in got for c in e["choices"] if c.get("finish_reason")]
    assert finishes == ["length"]
    text = "".join(c["delta"].get("content") or "" for e in got for c in e["choices"])
    assert text == choice["message"]["content"]
    assert got[-1]["usage"]["completion_tokens"] == usage["completion_tokens"]


async def test_a_prompt_over_the_context_is_the_engines_400(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    sim = await start_sim(zero_latency=True, max_model_len=MAX_MODEL_LEN)
    sidecar = await start_sidecar(model_server_port=sim.port, decode_chunk_size=CHUNK)
    long = {**BODY, "messages": [{"role": "user", "content": "far too long " * 100}]}
    async with client.post(sim.url + CHAT, json=long) as r:
        assert r.status == 400
        direct = await r.read()
    async with client.post(sidecar.url + CHAT, json=long) as r:
        assert r.status == 400
        relayed = await r.read()
    message = json.loads(relayed)["error"]["message"]
    assert message == json.loads(direct)["error"]["message"]
    # vLLM's wording for a prompt over the context.
    assert message.startswith(
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your request has "
    )
    assert message.endswith(" input tokens. Please reduce the length of the input messages.")


def test_a_refusal_says_the_room_left() -> None:
    older = (
        b'{"error": {"message": "This model\'s maximum context length is 96 tokens. However,'
        b' you requested 110 tokens (80 in the messages, 30 in the completion)."}}'
    )
    vllm = (
        b'{"error": {"message": "\'max_tokens\' or \'max_completion_tokens\' is too large: 30.'
        b" This model's maximum context length is 96 tokens and your request has 80 input"
        b' tokens (30 > 96 - 80)."}}'
    )
    for body in (older, vllm):
        assert is_context_refusal(400, body)
        assert context_room(body) == 16
    assert not is_context_refusal(500, vllm)
    assert context_room(b'{"error": {"message": "maximum context length exceeded"}}') is None


async def test_a_refusal_without_numbers_ends_the_answer_with_the_text_so_far(
    start_sim: Any,
    start_sidecar: StartSidecar,
    front_factory: Any,
    client: aiohttp.ClientSession,
) -> None:
    sim = await start_sim(zero_latency=True)
    front = await front_factory(sim.url)
    sidecar = await start_sidecar(model_server_port=front.port, decode_chunk_size=CHUNK)
    refusal = {"error": {"message": "Input exceeds the maximum context length", "code": 400}}
    front.fail[3] = (400, refusal)
    async with client.post(sidecar.url + CHAT, json=BODY) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 2 * CHUNK
    assert len(front.bodies) == 3

    front.bodies.clear()
    front.fail = {2: (400, refusal)}
    body = {**BODY, "stream": True}
    async with client.post(sidecar.url + CHAT, json=body) as r:
        assert r.status == 200
        raw = await r.read()
    got = events(raw)
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum(1 for e in got if "role" in e["choices"][0]["delta"]) == 1
    assert [e["choices"][0]["finish_reason"] for e in got] == [None, "length"]
    assert raw.rstrip().endswith(b"data: [DONE]")

    # A budgeted request's refusal stays an error: unchunked vLLM refuses it outright.
    front.bodies.clear()
    front.fail = {2: (400, refusal)}
    async with client.post(sidecar.url + CHAT, json={**BODY, "max_tokens": 3 * CHUNK}) as r:
        assert r.status == 400
