"""Chunked decode end to end: a sidecar with --decode-chunk-size in front of the simulator,
through a recording engine front that sees (and can fail or hold) every chunk."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import eventually, sample_sum
from tests.sidecar.conftest import RunningSidecar, StartSidecar

CHUNK = 8
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "tell me a long story about decoding"}]


@dataclass
class Front:
    """An engine front: forwards to the simulator, records each request body, and can
    answer the n-th request (1-based) with an error or hold it until cancelled."""

    target: str
    session: aiohttp.ClientSession
    bodies: list[dict[str, Any]] = field(default_factory=list)
    fail: dict[int, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    hold: int | None = None
    held: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        self.bodies.append(body)
        n = len(self.bodies)
        if n in self.fail:
            status, payload = self.fail[n]
            return web.json_response(payload, status=status)
        if n == self.hold:
            self.held.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with self.session.post(self.target + request.path, data=raw, headers=headers) as up:
            data = await up.read()
            return web.Response(
                status=up.status, body=data, content_type=up.content_type or "application/json"
            )


@pytest.fixture
async def front_factory() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []
    session = aiohttp.ClientSession()

    async def make(target: str) -> Front:
        front = Front(target, session)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", front.handle)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        front.port = runner.addresses[0][1]
        return front

    try:
        yield make
    finally:
        for runner in runners:
            await runner.cleanup()
        await session.close()


@dataclass
class Setup:
    sim: Any
    front: Front
    sidecar: RunningSidecar

    def url(self, path: str = CHAT) -> str:
        return self.sidecar.url + path


@pytest.fixture
async def chunked(start_sim: Any, start_sidecar: StartSidecar, front_factory: Any) -> Setup:
    sim = await start_sim(zero_latency=True)
    front = await front_factory(sim.url)
    sidecar = await start_sidecar(model_server_port=front.port, decode_chunk_size=CHUNK)
    return Setup(sim, front, sidecar)


def _chat(max_tokens: int | None = 20, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "sim-model", "messages": MESSAGES, **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


async def _post_json(client: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> Any:
    async with client.post(url, json=body, **kw) as resp:
        return resp.status, await resp.json()


async def _sse(client: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, list[bytes]]:
    async with client.post(url, json=body) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    return resp.status, [e for e in raw.split(b"\n\n") if e]


def _data(event: bytes) -> Any:
    line = next(x for x in event.split(b"\n") if x.startswith(b"data: "))
    return json.loads(line[len(b"data: ") :])


async def test_chat_json_is_reassembled_from_chunks(
    chunked: Setup, client: aiohttp.ClientSession
) -> None:
    status, answer = await _post_json(client, chunked.url(), _chat(20))
    assert status == 200, answer
    assert [b["max_tokens"] for b in chunked.front.bodies] == [8, 8, 4]
    assert all(b["stream"] is False for b in chunked.front.bodies)
    # Chunk 1 is the client's request; later ones continue the assistant message.
    assert chunked.front.bodies[0]["messages"] == MESSAGES
    assert "continue_final_message" not in chunked.front.bodies[0]
    for body in chunked.front.bodies[1:]:
        assert body["continue_final_message"] is True
        assert body["add_generation_prompt"] is False
        assert body["messages"][:-1] == MESSAGES
        assert body["messages"][-1]["role"] == "assistant"
    content = answer["choices"][0]["message"]["content"]
    assert chunked.front.bodies[2]["messages"][-1]["content"] == " ".join(content.split()[:16])
    assert len(content.split()) == 20
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["object"] == "chat.completion"
    # The client's prompt counted once; completion tokens over all chunks.
    async with client.post(chunked.sim.url + CHAT, json=_chat(1)) as direct:
        prompt = (await direct.json())["usage"]["prompt_tokens"]
    usage = answer["usage"]
    assert usage["prompt_tokens"] == prompt
    assert usage["completion_tokens"] == 20
    assert usage["total_tokens"] == prompt + 20
    assert chunked.sidecar.sample("pd_sidecar_decode_chunks_total") == 3


async def test_chat_sse_is_one_stream(chunked: Setup, client: aiohttp.ClientSession) -> None:
    options = {"include_usage": True}
    status, events = await _sse(
        client, chunked.url(), _chat(20, stream=True, stream_options=options)
    )
    assert status == 200
    assert events[-1] == b"data: [DONE]"
    assert events.count(b"data: [DONE]") == 1
    payloads = [_data(e) for e in events[:-1]]
    assert len({p["id"] for p in payloads}) == 1
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    chunks, usage_event = payloads[:-1], payloads[-1]
    assert len(chunks) == 3
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes == [None, None, "length"]
    roles = [c["choices"][0]["delta"].get("role") for c in chunks]
    assert roles == ["assistant", None, None]
    assert usage_event["choices"] == []
    assert usage_event["usage"]["completion_tokens"] == 20
    assert all("usage" not in c for c in chunks)
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    # The same request unstreamed gives the same text (the simulator is deterministic).
    _, answer = await _post_json(client, chunked.url(), _chat(20))
    assert text == answer["choices"][0]["message"]["content"]
    assert usage_event["usage"] == answer["usage"]
    # Every chunk went to the engine unstreamed, without the client's stream options.
    assert all(b["stream"] is False and "stream_options" not in b for b in chunked.front.bodies)


async def test_sse_without_include_usage_has_no_usage_event(
    chunked: Setup, client: aiohttp.ClientSession
) -> None:
    status, events = await _sse(client, chunked.url(), _chat(12, stream=True))
    assert status == 200
    payloads = [_data(e) for e in events[:-1]]
    assert len(payloads) == 2
    assert all(p["choices"] and "usage" not in p for p in payloads)


async def test_a_stop_in_a_middle_chunk_ends_the_answer(
    chunked: Setup, client: aiohttp.ClientSession
) -> None:
    _, full = await _post_json(client, chunked.url(), _chat(40))
    words = full["choices"][0]["message"]["content"].split(" ")
    # A phrase wholly inside chunk 2 (words 8..15) that does not occur before it.
    stop = next(
        " ".join(words[k : k + 2])
        for k in range(CHUNK, 2 * CHUNK - 1)
        if " ".join(words[k : k + 2]) not in " ".join(words[: k + 1])
    )
    chunked.front.bodies.clear()
    _, answer = await _post_json(client, chunked.url(), _chat(40, stop=[stop]))
    assert len(chunked.front.bodies) == 2  # no third chunk
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert stop not in choice["message"]["content"]
    assert " ".join(words).startswith(choice["message"]["content"])
    assert CHUNK < answer["usage"]["completion_tokens"] < 2 * CHUNK


async def test_without_max_tokens_chunks_run_until_the_model_stops(
    start_sim: Any, start_sidecar: StartSidecar, front_factory: Any, client: aiohttp.ClientSession
) -> None:
    sim = await start_sim(zero_latency=True, natural_output_tokens=CHUNK - 3)
    front = await front_factory(sim.url)
    sidecar = await start_sidecar(model_server_port=front.port, decode_chunk_size=CHUNK)
    status, answer = await _post_json(client, sidecar.url + CHAT, _chat(None))
    assert status == 200
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert [b["max_tokens"] for b in front.bodies] == [CHUNK]


async def test_budget_within_one_chunk_goes_unchanged(
    chunked: Setup, client: aiohttp.ClientSession
) -> None:
    body = _chat(CHUNK, n=2, stream=True)  # n > 1 is fine: nothing is chunked
    async with client.post(chunked.url(), json=body) as resp:
        assert resp.status == 200
        await resp.read()
    assert chunked.front.bodies == [body]
    assert chunked.sidecar.sample("pd_sidecar_decode_chunks_total") == 0


async def test_completions_are_not_chunked(chunked: Setup, client: aiohttp.ClientSession) -> None:
    body = {"model": "sim-model", "prompt": "once upon a time", "max_tokens": 20}
    status, answer = await _post_json(client, chunked.url("/v1/completions"), body)
    assert status == 200
    assert answer["usage"]["completion_tokens"] == 20
    assert chunked.front.bodies == [body]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"echo": True}, "echo"),
    ],
)
async def test_what_cannot_be_chunked_is_refused(
    chunked: Setup, client: aiohttp.ClientSession, extra: dict[str, Any], param: str
) -> None:
    status, answer = await _post_json(client, chunked.url(), _chat(20, **extra))
    assert status == 400
    assert answer["error"]["param"] == param
    assert "--decode-chunk-size" in answer["error"]["message"]
    assert chunked.front.bodies == []


async def test_error_in_the_first_chunk_is_relayed(
    chunked: Setup, client: aiohttp.ClientSession
) -> None:
    refusal = {"error": {"message": "no", "type": "BadRequestError", "code": 400}}
    chunked.front.fail[1] = (400, refusal)
    status, answer = await _post_json(client, chunked.url(), _chat(20, stream=True))
    assert status == 400
    assert answer == refusal
    assert len(chunked.front.bodies) == 1


async def test_error_in_a_later_chunk_is_the_json_answer(
    chunked: Setup, client: aiohttp.ClientSession
) -> None:
    chunked.front.fail[2] = (500, {"error": {"message": "engine died"}})
    status, answer = await _post_json(client, chunked.url(), _chat(20))
    # Nothing reached the client yet: the engine's answer, as any decode error.
    assert status == 500
    assert answer == {"error": {"message": "engine died"}}
    assert len(chunked.front.bodies) == 2


async def test_error_in_a_later_chunk_ends_the_stream_with_an_error_event(
    chunked: Setup, client: aiohttp.ClientSession
) -> None:
    chunked.front.fail[2] = (500, {"error": {"message": "engine died"}})
    status, events = await _sse(client, chunked.url(), _chat(20, stream=True))
    assert status == 200
    assert len(events) == 2
    assert _data(events[0])["choices"][0]["delta"]["content"]
    assert events[1].startswith(b"event: error\n")
    error = _data(events[1])
    assert error["error"]["stage"] == "decode"
    assert b"[DONE]" not in b"".join(events)
    assert len(chunked.front.bodies) == 2


async def test_client_leaving_mid_chunk_cancels_it_and_starts_no_other(
    chunked: Setup, client: aiohttp.ClientSession
) -> None:
    chunked.front.hold = 2
    body = _chat(40, stream=True)
    async with client.post(chunked.url(), json=body) as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert _data(first)["choices"][0]["delta"]["content"]
        await asyncio.wait_for(chunked.front.held.wait(), 30)
        resp.close()  # the client goes away while chunk 2 is in flight
    await asyncio.wait_for(chunked.front.cancelled.wait(), 30)
    registry = chunked.sidecar.servers.metrics.registry

    async def answered() -> bool:
        return sample_sum(registry, "pd_sidecar_requests_total", status="499") >= 1

    await eventually(answered, "the sidecar to finish the request", timeout=30)
    assert len(chunked.front.bodies) == 2


async def test_pd_decode_leg_is_chunked(
    start_sim: Any, start_sidecar: StartSidecar, front_factory: Any, client: aiohttp.ClientSession
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    front = await front_factory(decode.url)
    sidecar = await start_sidecar(model_server_port=front.port, decode_chunk_size=CHUNK)
    headers = {"x-prefiller-host-port": prefill.host_port}
    body = _chat(20, stream=True, stream_options={"include_usage": True})
    async with client.post(sidecar.url + CHAT, json=body, headers=headers) as resp:
        assert resp.status == 200
        events = [e for e in (await resp.read()).split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    usage = _data(events[-2])["usage"]
    assert usage["completion_tokens"] == 20
    # The prefill's view of cached tokens, as for any P/D answer.
    assert "cached_tokens" in usage["prompt_tokens_details"]
    assert (await prefill.stats())["requests_by_role"].get("prefill") == 1
    assert [b["max_tokens"] for b in front.bodies] == [8, 8, 4]
    assert "kv_transfer_params" in front.bodies[0]
    assert all("kv_transfer_params" not in b for b in front.bodies[1:])
    # Chunk 1 pulls the prefill's KV; later ones are plain requests on the decode engine.
    by_role = (await decode.stats())["requests_by_role"]
    assert (by_role.get("decode"), by_role.get("aggregated")) == (1, 2)
