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
from epp.director import DirectorSettings, build_director
from epp.kv_events import block_hashes, external_hash
from epp.kv_events.tokenizer import LocalTokenizer
from epp.metrics import EppMetrics
from epp.plugins.precise_prefix_producer import PrecisePrefixCacheProducer
from epp.plugins.prefix_producer import PREFIX_MATCH
from epp.request import parse_request
from epp.scheduling.cycle import CycleState
from examples.local_stack.processes import free_port
from tests.epp_scheduling.fixtures import all_fresh, pd_config, wait_until, write_endpoints
from vllm_sim import SimConfig, SimServer

from .engines import SERVED_MODEL, VllmEngine, client_session

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
    engines: list[VllmEngine]
    kv_port: int
    replay_port: int
    session: aiohttp.ClientSession
    # {name} is the engine's (pod's) name, {port} one of the two ports below.
    endpoint_template: str
    model_dir: Path

    @property
    def engine(self) -> VllmEngine:
        return self.engines[0]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def published(
    vllm_python: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Published]:
    workdir = tmp_path_factory.mktemp("kv-events")
    print(f"engine logs: {workdir}")
    # vLLM binds only wildcard or ipc:// endpoints (it connects to other tcp:// ones);
    # unix sockets keep the test off the network. The "ports" only name the files.
    kv_port, replay_port = free_port(), free_port()
    template = f"ipc://{workdir}/{{name}}-{{port}}"
    cpus = sorted(os.sched_getaffinity(0))
    binds = [str(cpus[0]), str(cpus[1])] if len(cpus) >= 2 else ["auto", "auto"]
    engines = []
    for name, cpu in zip(("kv-a", "kv-b"), binds, strict=True):
        events_config = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": template.format(name=name, port=kv_port),
            "replay_endpoint": template.format(name=name, port=replay_port),
            "topic": f"kv@{name}@{SERVED_MODEL}",
        }
        engines.append(
            VllmEngine(
                name,
                vllm_python,
                tiny_model,
                workdir,
                cpu,
                extra_args=[
                    # The CPU backend's default is 128; 32 keeps the prompts short.
                    "--block-size", str(BLOCK_SIZE),
                    "--prefix-caching-hash-algo", "sha256_cbor",
                    "--kv-events-config", json.dumps(events_config),
                ],
                # For POST /reset_prefix_cache (the eviction step).
                extra_env={"VLLM_SERVER_DEV_MODE": "1"},
            )
        )  # fmt: skip
    session = client_session()
    try:
        for engine in engines:
            await engine.start()
        for engine in engines:
            await engine.wait_healthy(session)
        yield Published(engines, kv_port, replay_port, session, template, tiny_model)
    finally:
        for engine in engines:
            await engine.stop()
        await session.close()


def _chat(text: str) -> dict[str, Any]:
    return {
        "model": SERVED_MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 1,
    }


async def _send(p: Published, text: str, engine: VllmEngine | None = None) -> None:
    url = (engine or p.engine).url
    async with p.session.post(f"{url}/v1/chat/completions", json=_chat(text)) as resp:
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
    ep = Endpoint(p.engine.name, "127.0.0.1", p.engine.port)
    ctx = zmq.asyncio.Context()
    raw = ctx.socket(zmq.SUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.SUBSCRIBE, b"")
    raw.connect(p.endpoint_template.format(name=p.engine.name, port=p.kv_port))
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


ROUTED = "Explain how a lighthouse keeper trims the lamp every night. " + "oil wick glass " * 12


async def test_routing_follows_the_real_engines_cache(published: Published, tmp_path: Path) -> None:
    """Two real decode engines (and a simulated prefill pod, never contacted): a prompt
    sent straight to one of them routes there decode-only although the approximate index
    points at the other; after its prefix cache is reset, the request disaggregates."""
    p = published
    a, b = p.engines
    prefill = await SimServer(SimConfig(port=0, role="prefill", zero_latency=True)).start()
    endpoints_file = tmp_path / "endpoints.yaml"
    write_endpoints(
        endpoints_file,
        [
            (a.name, "127.0.0.1", a.port, "decode"),
            (b.name, "127.0.0.1", b.port, "decode"),
            ("sim-prefill", "127.0.0.1", prefill.port, "prefill"),
        ],
    )
    plugins = f"""
- type: decode-filter
- type: prefill-filter
- type: encode-filter
- type: precise-prefix-cache-producer
  parameters:
    kvEventsPort: {p.kv_port}
    replayPort: {p.replay_port}
    endpointTemplate: "{p.endpoint_template}"
    blockSize: {BLOCK_SIZE}
    hashSeed: "0"
- type: prefix-cache-scorer
- type: queue-scorer
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {{nonCachedTokens: 32}}
- type: disagg-profile-handler
  parameters:
    deciders: {{prefill: prefix-based-pd-decider}}
"""
    profiles = """
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: queue-scorer
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: queue-scorer
- name: encode
  plugins:
  - pluginRef: encode-filter
  - pluginRef: queue-scorer
"""
    settings = DirectorSettings(
        config_text=pd_config(endpoints_file, plugins=plugins, profiles=profiles),
        refresh_metrics_interval_s=0.5,
        metrics_staleness_threshold_s=30.0,
    )
    director = await build_director(settings, EppMetrics())
    producer = next(x for x in director.config.plugins if isinstance(x, PrecisePrefixCacheProducer))
    await director.start()
    try:
        key = {e.name: e.host_port for e in (a, b)}
        deadline = time.monotonic() + 120
        i = 0
        while not all(producer.index.knows(key[e.name]) for e in (a, b)):
            assert time.monotonic() < deadline, "no KV events from the engines"
            for e in (a, b):
                if not producer.index.knows(key[e.name]):
                    await _send(p, f"warm up routing {i} " + "words " * 40, e)
            i += 1
            await asyncio.sleep(0.2)  # the engines publish from a background thread
        await wait_until(lambda: all_fresh(director), timeout=30)

        body = json.dumps(_chat(ROUTED)).encode()
        first = await director.decide(CHAT, {}, body, None)
        first.on_finished()
        assert first.decision_type == "prefill-decode"
        x = a if first.decode == key[a.name] else b
        y = b if x is a else a
        # approximate: x (recorded once the decision is out)
        await wait_until(lambda: producer.fallback.index.size(key[x.name]) > 0)

        await _send(p, ROUTED, y)  # cached on y behind the EPP's back
        async with p.session.post(
            f"{y.url}/tokenize", json={"model": SERVED_MODEL, **_chat(ROUTED)}
        ) as resp:
            tokens = (await resp.json())["tokens"]
        keys = [external_hash(h) for h in block_hashes(tokens, BLOCK_SIZE, "0")]
        await wait_until(
            lambda: producer.index.match(keys, [key[y.name]]) == {key[y.name]: len(keys)}, 30
        )
        second = await director.decide(CHAT, {}, body, None)
        second.on_finished()
        assert second.decode == key[y.name]
        assert second.decision_type == "decode-only"

        async with p.session.post(f"{y.url}/reset_prefix_cache") as resp:
            assert resp.status == 200, await resp.text()
        # The engine publishes its queued events (AllBlocksCleared) on its next step.
        await _send(p, "after the reset " + "words " * 40, y)
        await wait_until(lambda: producer.index.match(keys, [key[y.name]]) == {}, 30)
        third = await director.decide(CHAT, {}, body, None)
        third.on_finished()
        assert third.decision_type == "prefill-decode"
    finally:
        await director.stop()
        await prefill.stop()
