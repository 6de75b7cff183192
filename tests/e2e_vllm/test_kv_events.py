"""Precise prefix routing against a real vLLM engine: the EPP's block hashes for a chat
prompt equal the hashes in the engine's own BlockStored events, and the precise
producer (tokens from the engine's /tokenize) sees the prompt as cached there."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio

from epp.datastore import Endpoint
from epp.kv_events import block_hashes, external_hash
from epp.kv_events.tokenizer import LocalTokenizer
from epp.plugins.precise_prefix_producer import PrecisePrefixCacheProducer
from epp.plugins.prefix_producer import PREFIX_MATCH
from epp.request import parse_request
from epp.scheduling.cycle import CycleState
from examples.local_stack.processes import free_port

from .engines import SERVED_MODEL, VllmEngine

pytestmark = [
    pytest.mark.vllm_e2e,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),
]

CHAT = "/v1/chat/completions"
BLOCK_SIZE = 32
TEXT = "Describe the history of the printing press in detail. " + "movable type " * 15


@dataclass
class Published:
    engine: VllmEngine
    kv_port: int
    replay_port: int
    session: aiohttp.ClientSession
    endpoint_template: str
    model_dir: Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def published(
    vllm_python: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Published]:
    workdir = tmp_path_factory.mktemp("kv-events")
    print(f"engine log: {workdir}")
    # vLLM binds only wildcard or ipc:// endpoints (it connects to other tcp:// ones);
    # unix sockets keep the test off the network. The "ports" only name the files.
    kv_port, replay_port = free_port(), free_port()
    events_config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"ipc://{workdir}/kv-{kv_port}",
        "replay_endpoint": f"ipc://{workdir}/kv-{replay_port}",
        "topic": f"kv@engine@{SERVED_MODEL}",
    }
    cpus = sorted(os.sched_getaffinity(0))
    engine = VllmEngine(
        "vllm-kv-events",
        vllm_python,
        tiny_model,
        workdir,
        str(cpus[0]) if len(cpus) >= 2 else "auto",
        extra_args=[
            # The CPU backend's default is 128; 32 keeps the prompts short.
            "--block-size", str(BLOCK_SIZE),
            "--prefix-caching-hash-algo", "sha256_cbor",
            "--kv-events-config", json.dumps(events_config),
        ],
    )  # fmt: skip
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60, sock_connect=2))
    try:
        await engine.start()
        await engine.wait_healthy(session)
        yield Published(
            engine, kv_port, replay_port, session, f"ipc://{workdir}/kv-{{port}}", tiny_model
        )
    finally:
        await engine.stop()
        await session.close()


def _chat(text: str) -> dict[str, Any]:
    return {
        "model": SERVED_MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 1,
    }


async def _send(p: Published, text: str) -> None:
    async with p.session.post(f"{p.engine.url}/v1/chat/completions", json=_chat(text)) as resp:
        assert resp.status == 200, await resp.text()


async def test_epp_block_hashes_equal_the_engines_and_route_precisely(
    published: Published,
) -> None:
    p = published
    producer = PrecisePrefixCacheProducer(
        PrecisePrefixCacheProducer.Params(
            kvEventsPort=p.kv_port,
            replayPort=p.replay_port,
            hashSeed="0",
            blockSize=BLOCK_SIZE,
            endpointTemplate=p.endpoint_template,
        )
    )
    ep = Endpoint("engine", "127.0.0.1", p.engine.port)
    ctx = zmq.asyncio.Context()
    raw = ctx.socket(zmq.SUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.SUBSCRIBE, b"")
    raw.connect(p.endpoint_template.format(port=p.kv_port))
    producer.endpoints_changed([ep], [])
    try:
        # Publish until both our raw socket and the producer have heard from the engine.
        deadline = time.monotonic() + 120
        i = 0
        while not producer.index.knows(ep.key) or not await raw.poll(0):
            assert time.monotonic() < deadline, "no KV events from the engine"
            await _send(p, f"warm up {i} " + "words " * 40)
            i += 1
            await asyncio.sleep(0.2)  # the engine publishes from a background thread
        while await raw.poll(0):
            await raw.recv_multipart()

        await _send(p, TEXT)
        stored: list[bytes] = []
        block_size = 0
        end = time.monotonic() + 30
        async with p.session.post(
            f"{p.engine.url}/tokenize", json={"model": SERVED_MODEL, **_chat(TEXT)}
        ) as resp:
            tokens = (await resp.json())["tokens"]
        # The EPP's own tokenizer (model directory, chat template) agrees with the engine.
        local = LocalTokenizer(p.model_dir)
        assert local.encode_chat(_chat(TEXT)["messages"]) == tokens
        while time.monotonic() < end:
            if not await raw.poll(500):
                if stored:
                    break
                continue
            _, _, payload = await raw.recv_multipart()
            for ev in msgpack.unpackb(payload, raw=False)[1]:
                if isinstance(ev, dict) and ev.get("type") == "BlockStored":
                    stored += ev["block_hashes"]
                    block_size = ev["block_size"]
        assert stored, "the prompt produced no BlockStored event"
        ours = block_hashes(tokens, block_size, "0")
        assert ours, f"prompt of {len(tokens)} tokens has no full block of {block_size}"
        # vLLM 0.32 publishes the low 64 bits as an int by default; the index keys agree.
        assert [external_hash(h) for h in ours] == [external_hash(h) for h in stored[: len(ours)]]

        assert block_size == BLOCK_SIZE
        # The precise producer: /tokenize on the engine, hashes, index lookup.
        keys = [external_hash(h) for h in ours]
        deadline = time.monotonic() + 30
        while producer.index.match(keys, [ep.key]) != {ep.key: len(keys)}:
            assert time.monotonic() < deadline, "the index never held the prompt"
            await asyncio.sleep(0.05)
        body = json.dumps(_chat(TEXT)).encode()
        cycle = CycleState(parse_request(CHAT, {}, body), time.monotonic(), 5.0)
        await producer.prefetch(cycle, [ep])
        producer.prepare(cycle, [ep])
        match = cycle.get(PREFIX_MATCH)
        assert match is not None
        assert match.source == "precise"
        assert match.blocks(ep) == len(ours)
    finally:
        raw.close(0)
        await producer.aclose()
        ctx.term()
