"""The simulator publishes vLLM's KV events from its prefix cache and serves /tokenize."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from tests.conftest import StartSim
from vllm_sim.block_hash import chain_hashes
from vllm_sim.tokens import chat_prompt, tokenize


async def _next_batch(sub: zmq.asyncio.Socket) -> tuple[int, list[Any]]:
    topic, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
    assert topic.startswith(b"kv@")
    ts, events = msgpack.unpackb(payload, raw=False)[:2]
    assert isinstance(ts, float)
    return int.from_bytes(seq, "big"), events


async def _subscribed(ctx: zmq.asyncio.Context, port: int) -> zmq.asyncio.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    return sub


async def _complete(sim: Any, prompt: str) -> dict[str, Any]:
    async with sim.session.post(
        f"{sim.url}/v1/completions", json={"model": "sim-model", "prompt": prompt, "max_tokens": 1}
    ) as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


def _has_stored(events: list[Any]) -> bool:
    return any((e.get("type") if isinstance(e, dict) else e[0]) == "BlockStored" for e in events)


async def _first_events(sim: Any, sub: zmq.asyncio.Socket, prompt: str) -> tuple[int, list[Any]]:
    """Send ``prompt`` until a batch with its BlockStored arrives (the SUB socket connects
    asynchronously; a cache reset between attempts makes the engine store it again)."""
    for _ in range(100):
        await _complete(sim, prompt)
        try:
            while True:
                seq, events = await asyncio.wait_for(_next_batch(sub), 0.2)
                if _has_stored(events):
                    return seq, events
        except TimeoutError:
            await sim.reset(cache=True)
    raise AssertionError("no KV events received")


async def test_block_stored_carries_vllm_hashes(start_sim: StartSim) -> None:
    sim = await start_sim(
        zero_latency=True, kv_events_port=0, block_size=4, hash_seed="7", kv_events_int_hashes=False
    )
    ctx = zmq.asyncio.Context()
    sub = await _subscribed(ctx, sim.engine.kv_events.port)
    try:
        prompt = " ".join(f"w{i}" for i in range(10))
        _, events = await _first_events(sim, sub, prompt)
        stored = [e for e in events if e["type"] == "BlockStored"][-1]
        tokens = tokenize(prompt)
        assert stored["block_hashes"] == chain_hashes(tokens, 4, "7")
        assert stored["parent_block_hash"] is None
        assert stored["token_ids"] == tokens[: len(tokens) // 4 * 4]
        assert stored["block_size"] == 4
        assert stored["medium"] == "GPU"
    finally:
        sub.close(0)
        ctx.term()


async def test_eviction_publishes_block_removed(start_sim: StartSim) -> None:
    sim = await start_sim(
        zero_latency=True, kv_events_port=0, block_size=4, num_blocks=4, kv_events_int_hashes=False
    )
    ctx = zmq.asyncio.Context()
    sub = await _subscribed(ctx, sim.engine.kv_events.port)
    try:
        first = " ".join(f"a{i}" for i in range(12))  # 3 full blocks of 4
        _, events = await _first_events(sim, sub, first)
        first_hashes = chain_hashes(tokenize(first), 4, None)
        await _complete(sim, " ".join(f"b{i}" for i in range(12)))
        removed: list[bytes] = []
        while len(removed) < 2:
            _, events = await _next_batch(sub)
            removed += [h for e in events if e["type"] == "BlockRemoved" for h in e["block_hashes"]]
        assert set(removed) <= set(first_hashes)
    finally:
        sub.close(0)
        ctx.term()


async def test_array_encoding_int_hashes_and_cache_reset(start_sim: StartSim) -> None:
    sim = await start_sim(
        zero_latency=True,
        kv_events_port=0,
        kv_events_encoding="array",
        kv_events_int_hashes=True,
        block_size=4,
    )
    ctx = zmq.asyncio.Context()
    sub = await _subscribed(ctx, sim.engine.kv_events.port)
    try:
        _, events = await _first_events(sim, sub, "one two three four five")
        tag, hashes = events[-1][0], events[-1][1]
        assert tag == "BlockStored"
        assert all(isinstance(h, int) and 0 <= h < 2**64 for h in hashes)
        await sim.reset(cache=True)
        _, events = await _next_batch(sub)
        assert ["AllBlocksCleared"] in events
    finally:
        sub.close(0)
        ctx.term()


async def test_replay_socket_answers_from_a_sequence(start_sim: StartSim) -> None:
    sim = await start_sim(zero_latency=True, kv_events_port=0, kv_events_replay_port=0)
    for i in range(3):
        await _complete(sim, f"prompt number {i} " * 8)
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{sim.engine.kv_events.replay_port}")
    try:
        await dealer.send_multipart([b"", (1).to_bytes(8, "big")])
        seqs = []
        while True:
            frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
            if frames[2] == (-1).to_bytes(8, "big", signed=True):
                break
            seqs.append(int.from_bytes(frames[2], "big"))
        assert seqs == [1, 2]
    finally:
        dealer.close(0)
        ctx.term()


async def test_tokenize_prompt_and_chat(start_sim: StartSim) -> None:
    sim = await start_sim(zero_latency=True)
    async with sim.session.post(f"{sim.url}/tokenize", json={"prompt": "hello world"}) as resp:
        body = await resp.json()
    assert body == {
        "count": 2,
        "max_model_len": 8192,
        "tokens": tokenize("hello world"),
        "token_strs": None,
    }
    messages = [{"role": "user", "content": "hi there"}]
    async with sim.session.post(
        f"{sim.url}/tokenize", json={"model": "sim-model", "messages": messages}
    ) as resp:
        body = await resp.json()
    assert body["tokens"] == tokenize(chat_prompt(messages))


@pytest.mark.parametrize(
    ("payload", "status"),
    [({"model": "other", "prompt": "x"}, 404), ({"prompt": 3}, 400), ({"messages": "x"}, 400)],
)
async def test_tokenize_rejects_bad_input(
    start_sim: StartSim, payload: dict[str, Any], status: int
) -> None:
    sim = await start_sim(zero_latency=True)
    async with sim.session.post(f"{sim.url}/tokenize", json=payload) as resp:
        assert resp.status == status
        assert "error" in await resp.json()
