"""The encode stage (E/P/D and E/PD) against simulated encoders, prefillers and decoders."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.conftest import eventually
from tests.sidecar.conftest import StartSidecar
from tests.sidecar_connectors.conftest import sse_events
from vllm_sim.tokens import mm_hash

CAT = "https://example.invalid/cat.png"
DOG = "https://example.invalid/dog.png"
AUDIO = {"data": "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQAAAAA=", "format": "wav"}
PATH = "/v1/chat/completions"


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


AUDIO_PART = {"type": "input_audio", "input_audio": AUDIO}


def chat(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": "describe what you see and hear " * 4}, *parts]
    return {
        "model": "sim-model", "messages": [{"role": "user", "content": content}],
        "max_tokens": 3, **extra,
    }  # fmt: skip


def hashes(*parts: dict[str, Any]) -> set[str]:
    out = set()
    for part in parts:
        kind = part["type"]
        source = part[kind].get("url", part[kind].get("data"))
        out.add(mm_hash(f"{kind}:{source}"))
    return out


async def encoders(start_sim: Any, n: int, connector: str, **extra: Any) -> list[Any]:
    return [
        await start_sim(zero_latency=True, role="encode", ec_connector=connector, **extra)
        for _ in range(n)
    ]


def encoder_header(sims: list[Any]) -> str:
    return ",".join(sim.host_port for sim in sims)


async def test_epd_with_images_a_duplicate_and_audio(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    es = await encoders(start_sim, 2, "ec-nixl")
    p = await start_sim(zero_latency=True, ec_connector="ec-nixl")
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port, ec_connector="ec-nixl")
    parts = (image(CAT), image(DOG), image(CAT), AUDIO_PART)
    headers = {"x-prefiller-host-port": p.host_port, "x-encoder-hosts-ports": encoder_header(es)}
    async with client.post(sidecar.url + PATH, json=chat(*parts), headers=headers) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert answer["choices"][0]["finish_reason"] == "length"

    e_stats = [await e.stats() for e in es]
    # Three distinct items (the cat twice): encoded once each, spread over both encoders.
    assert sorted(s["encodes"] for s in e_stats) == [1, 2]
    sent = [rec for s in e_stats for rec in s["recorded"]]
    for rec in sent:
        body = rec["body"]
        assert body["max_tokens"] == 1 and body["stream"] is False
        assert body["model"] == "sim-model"
        [message] = body["messages"]
        assert message["role"] == "user" and len(message["content"]) == 1
    assert sorted(str(rec["body"]["messages"][0]["content"][0]) for rec in sent) == sorted(
        str(part) for part in (image(CAT), image(DOG), AUDIO_PART)
    )
    request_ids = {rec["headers"]["x-request-id"] for rec in sent}
    p_stats, d_stats = await p.stats(), await d.stats()
    assert (p_stats["ec_loads_ok"], p_stats["ec_loads_failed"]) == (3, 0)
    p_body = p_stats["recorded"][0]["body"]
    assert set(p_body["ec_transfer_params"]) == hashes(*parts)
    assert request_ids == {p_stats["recorded"][0]["headers"]["x-request-id"]}
    # The decode gets the KV, not the encoder outputs.
    assert "ec_transfer_params" not in d_stats["recorded"][0]["body"]
    assert d_stats["kv_pulls_ok"] == 1
    assert sidecar.sample("pd_sidecar_encode_items_total") == 3


async def test_epd_streaming_with_the_openai_client(
    start_sim: Any, start_sidecar: StartSidecar
) -> None:
    es = await encoders(start_sim, 3, "ec-nixl")
    p = await start_sim(zero_latency=True, ec_connector="ec-nixl")
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port, ec_connector="ec-nixl")
    headers = {"x-prefiller-host-port": p.host_port, "x-encoder-hosts-ports": encoder_header(es)}
    body = chat(image(CAT), image(DOG), AUDIO_PART)
    async with openai.AsyncOpenAI(
        base_url=f"{sidecar.url}/v1", api_key="unused", max_retries=0, default_headers=headers
    ) as oa:
        stream = await oa.chat.completions.create(
            model="sim-model", messages=body["messages"], max_tokens=3, stream=True
        )
        chunks = [c async for c in stream]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert [(await e.stats())["encodes"] for e in es] == [1, 1, 1]  # round robin
    assert (await p.stats())["ec_loads_ok"] == 3
    assert (await d.stats())["recorded"][0]["body"]["stream"] is True


@pytest.mark.parametrize("stream", [False, True])
async def test_e_pd_encoder_outputs_go_to_the_decode(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, stream: bool
) -> None:
    es = await encoders(start_sim, 2, "ec-nixl")
    d = await start_sim(zero_latency=True, ec_connector="ec-nixl")
    sidecar = await start_sidecar(model_server_port=d.port, ec_connector="ec-nixl")
    parts = (image(CAT), image(DOG), image(DOG), AUDIO_PART)
    headers = {"x-encoder-hosts-ports": encoder_header(es)}
    body = chat(*parts, stream=stream)
    async with client.post(sidecar.url + PATH, json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        if stream:
            assert sse_events(await r.text())[-1] == "[DONE]"
    d_stats = await d.stats()
    assert (d_stats["ec_loads_ok"], d_stats["ec_loads_failed"]) == (3, 0)
    d_body = d_stats["recorded"][0]["body"]
    assert set(d_body["ec_transfer_params"]) == hashes(*parts)
    assert d_body["stream"] is stream
    assert sum([(await e.stats())["encodes"] for e in es]) == 3
    assert sidecar.sample("pd_sidecar_requests_total", path=PATH, mode="epd", status="200") == 1


async def test_ec_example_puts_nothing_on_the_wire(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    es = await encoders(start_sim, 2, "ec-example", shared_storage_path=str(tmp_path))
    d = await start_sim(zero_latency=True, ec_connector="ec-example",
                        shared_storage_path=str(tmp_path))  # fmt: skip
    sidecar = await start_sidecar(model_server_port=d.port, ec_connector="ec-example")
    headers = {"x-encoder-hosts-ports": encoder_header(es)}
    async with client.post(
        sidecar.url + PATH, json=chat(image(CAT), AUDIO_PART), headers=headers
    ) as r:
        assert r.status == 200, await r.text()
    d_stats = await d.stats()
    assert d_stats["ec_loads_ok"] == 2
    assert "ec_transfer_params" not in d_stats["recorded"][0]["body"]


async def test_failing_encoder_is_502_encode_and_cancels_the_others(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    failing, hanging = await encoders(start_sim, 2, "ec-nixl")
    p = await start_sim(zero_latency=True, ec_connector="ec-nixl")
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port, ec_connector="ec-nixl")
    await failing.add_fault(kind="status", status=500)
    await hanging.add_fault(kind="hang")
    headers = {
        "x-prefiller-host-port": p.host_port,
        "x-encoder-hosts-ports": encoder_header([failing, hanging]),
    }
    async with client.post(
        sidecar.url + PATH, json=chat(image(CAT), image(DOG)), headers=headers
    ) as r:
        assert r.status == 502
        error = (await r.json())["error"]
    assert error["stage"] == "encode"
    assert failing.host_port in error["message"] and "500" in error["message"]

    async def hanging_encode_cancelled() -> bool:
        return (await hanging.stats())["aborts"] == 1

    await eventually(hanging_encode_cancelled, what="the other encode cancelled")
    assert (await p.stats())["requests_total"] == 0
    assert (await d.stats())["requests_total"] == 0
    assert sidecar.sample("pd_sidecar_encode_failures_total", reason="status_500") == 1


async def test_unavailable_encoder_is_retried_on_the_next(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    es = await encoders(start_sim, 2, "ec-nixl")
    d = await start_sim(zero_latency=True, ec_connector="ec-nixl")
    sidecar = await start_sidecar(model_server_port=d.port, ec_connector="ec-nixl")
    await es[0].add_fault(kind="status", status=503)
    headers = {"x-encoder-hosts-ports": encoder_header(es)}
    async with client.post(sidecar.url + PATH, json=chat(image(CAT)), headers=headers) as r:
        assert r.status == 200, await r.text()
    assert [(await e.stats())["encodes"] for e in es] == [0, 1]
    assert sidecar.sample("pd_sidecar_encode_retries_total", reason="status_503") == 1


async def test_encoder_without_params_under_ec_nixl_is_502(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    [e] = await encoders(start_sim, 1, "ec-example", shared_storage_path=str(tmp_path))
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port, ec_connector="ec-nixl")
    headers = {"x-encoder-hosts-ports": e.host_port}
    async with client.post(sidecar.url + PATH, json=chat(image(CAT)), headers=headers) as r:
        assert r.status == 502
        error = (await r.json())["error"]
    assert error["stage"] == "encode" and "ec_transfer_params" in error["message"]
    assert (await d.stats())["requests_total"] == 0


@pytest.fixture
async def clashing_encoder() -> AsyncIterator[str]:
    """An encoder that answers every item with a different descriptor under one hash
    (the simulator's encoders never clash, so this one is written here)."""

    async def encode(request: web.Request) -> web.Response:
        body = await request.json()
        [part] = body["messages"][0]["content"]
        size = len(part["image_url"]["url"])
        descriptor = {"peer_host": "127.0.0.1", "peer_port": 1, "size_bytes": size,
                      "nixl_agent_metadata_b64": ""}  # fmt: skip
        return web.json_response({"choices": [], "ec_transfer_params": {"same": descriptor}})

    app = web.Application()
    app.router.add_post(PATH, encode)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_conflicting_descriptors_are_502_encode(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession,
    clashing_encoder: str,
) -> None:  # fmt: skip
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port, ec_connector="ec-nixl")
    headers = {"x-encoder-hosts-ports": clashing_encoder}
    body = chat(image(CAT), image("https://example.invalid/horse.png"))
    async with client.post(sidecar.url + PATH, json=body, headers=headers) as r:
        assert r.status == 502
        error = (await r.json())["error"]
    assert error["stage"] == "encode" and "conflicting" in error["message"]
    assert "same" in error["message"]
    assert (await d.stats())["requests_total"] == 0
    assert sidecar.sample("pd_sidecar_encode_failures_total", reason="conflict") == 1


async def test_text_only_requests_skip_the_stage(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    [e] = await encoders(start_sim, 1, "ec-nixl")
    p = await start_sim(zero_latency=True, ec_connector="ec-nixl")
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port, ec_connector="ec-nixl")
    text = {"model": "sim-model", "messages": [{"role": "user", "content": "hello " * 20}],
            "max_tokens": 2}  # fmt: skip
    both = {"x-prefiller-host-port": p.host_port, "x-encoder-hosts-ports": e.host_port}
    results = await asyncio.gather(
        client.post(sidecar.url + PATH, json=text, headers=both),
        client.post(sidecar.url + PATH, json=text, headers={"x-encoder-hosts-ports": e.host_port}),
    )
    for r in results:
        assert r.status == 200
        r.release()
    assert (await e.stats())["requests_total"] == 0
    assert (await p.stats())["requests_total"] == 1
    d_bodies = [rec["body"] for rec in (await d.stats())["recorded"]]
    assert text in d_bodies  # E/PD without items: the body as the client sent it


async def test_encoder_header_without_ec_connector_is_ignored(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    [e] = await encoders(start_sim, 1, "ec-nixl")
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port)
    headers = {"x-encoder-hosts-ports": e.host_port}
    async with client.post(sidecar.url + PATH, json=chat(image(CAT)), headers=headers) as r:
        assert r.status == 200
    assert (await e.stats())["requests_total"] == 0
    d_rec = (await d.stats())["recorded"][0]
    assert "x-encoder-hosts-ports" not in d_rec["headers"]


async def test_bad_encoder_header_is_400(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port, ec_connector="ec-nixl")
    headers = {"x-encoder-hosts-ports": "not a target"}
    async with client.post(sidecar.url + PATH, json=chat(image(CAT)), headers=headers) as r:
        assert r.status == 400
        assert "x-encoder-hosts-ports" in (await r.json())["error"]["message"]


async def test_local_fallback_keeps_the_encoder_outputs(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    [e] = await encoders(start_sim, 1, "ec-nixl")
    p = await start_sim(zero_latency=True, ec_connector="ec-nixl")
    d = await start_sim(zero_latency=True, ec_connector="ec-nixl")
    sidecar = await start_sidecar(
        model_server_port=d.port, ec_connector="ec-nixl", prefill_fallback="local",
        prefill_max_retries=0,
    )  # fmt: skip
    await p.add_fault(kind="status", status=503)
    headers = {"x-prefiller-host-port": p.host_port, "x-encoder-hosts-ports": e.host_port}
    async with client.post(sidecar.url + PATH, json=chat(image(CAT)), headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["x-pd-prefill-fallback"] == "status_503"
    d_stats = await d.stats()
    assert d_stats["ec_loads_ok"] == 1
    assert set(d_stats["recorded"][0]["body"]["ec_transfer_params"]) == hashes(image(CAT))
