"""--data-parallel-size: rank r serves port+r and forwards to model-server-port+r, on every path."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from sidecar.app import SERVICES
from sidecar.settings import SettingsError, load_settings
from tests.sidecar.conftest import StartSidecar

from .conftest import contiguous

RANKS = 3
BODY = {"model": "sim-model", "prompt": "data parallel", "max_tokens": 3}


async def roles(sims: list[Any]) -> list[dict[str, int]]:
    return [dict((await sim.stats())["requests_by_role"]) for sim in sims]


async def test_each_rank_forwards_to_its_own_engine_on_every_path(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    engines = await contiguous(start_sim, RANKS, role="decode", zero_latency=True)
    prefill = await start_sim(role="prefill", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=engines[0].port, data_parallel_size=RANKS)
    ports = sidecar.servers.ports
    assert len(set(ports)) == RANKS and ports[0] == sidecar.servers.port

    for rank, port in enumerate(ports):
        url = f"http://127.0.0.1:{port}"
        # Aggregated (no prefill header): passthrough to this rank's engine.
        async with client.post(url + "/v1/completions", json=BODY) as resp:
            assert resp.status == 200, await resp.text()
        # P/D: the decode leg goes to this rank's engine, which pulls the KV.
        headers = {"x-prefiller-host-port": prefill.host_port}
        async with client.post(url + "/v1/completions", json=BODY, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        # Streaming P/D too.
        stream = {**BODY, "stream": True}
        async with client.post(url + "/v1/completions", json=stream, headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.read()).rstrip().endswith(b"data: [DONE]")
        # Any other path (a GET) passes through to this rank's engine.
        async with client.get(url + "/sim/stats") as resp:
            assert resp.status == 200
            assert (await resp.json())["engine_id"] == (await engines[rank].stats())["engine_id"]
        for index, counts in enumerate(await roles(engines)):
            done = index <= rank
            assert counts.get("aggregated", 0) == (1 if done else 0), (rank, index, counts)
            assert counts.get("decode", 0) == (2 if done else 0), (rank, index, counts)
    for engine in engines:
        stats = await engine.stats()
        assert stats["kv_pulls_ok"] == 2
    assert (await prefill.stats())["requests_by_role"]["prefill"] == 2 * RANKS
    # One metrics port counts the requests of every rank.
    async with client.get(sidecar.metrics_url) as resp:
        text = await resp.text()
    assert (
        f'pd_sidecar_requests_total{{mode="pd",path="/v1/completions",status="200"}} {2.0 * RANKS}'
        in text
    )


async def test_each_rank_is_ready_when_its_own_engine_is(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    engines = await contiguous(start_sim, RANKS, role="decode", zero_latency=True)
    sidecar = await start_sidecar(
        model_server_port=engines[0].port, data_parallel_size=RANKS, ready_cache_ttl=0
    )

    async def ready() -> list[int]:
        out = []
        for port in sidecar.servers.ports:
            async with client.get(f"http://127.0.0.1:{port}/ready") as resp:
                out.append(resp.status)
        return out

    assert await ready() == [200, 200, 200]
    # Rank 1's engine goes away: only rank 1 stops being ready.
    await engines[1].server.stop()
    assert await ready() == [200, 503, 200]
    # Draining makes every rank not ready at once.
    drain = sidecar.servers.drain_and_stop()
    services = sidecar.servers.app[SERVICES]
    assert services.ranks is not None
    await drain
    assert all(rank.readiness.draining for rank in services.ranks.all)


async def test_ranks_listen_on_consecutive_ports(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    engines = await contiguous(start_sim, 2, role="decode", zero_latency=True)

    async def start(port: int, **kwargs: Any) -> Any:
        return await start_sidecar(port=port, **kwargs)

    (sidecar,) = await contiguous(start, 1, model_server_port=engines[0].port, data_parallel_size=2)
    base = sidecar.settings.port
    assert sidecar.servers.ports == (base, base + 1)
    async with client.post(f"http://127.0.0.1:{base + 1}/v1/completions", json=BODY) as resp:
        assert resp.status == 200
    assert [c.get("aggregated", 0) for c in await roles(engines)] == [0, 1]


def test_port_ranges_are_checked() -> None:
    with pytest.raises(SettingsError, match="--data-parallel-size"):
        load_settings(["--port=65535", "--data-parallel-size=2"])
    with pytest.raises(SettingsError, match="--data-parallel-size"):
        load_settings(["--port=8000", "--model-server-port=8001", "--data-parallel-size=2"])
    settings = load_settings(["--data-parallel-size=4"])
    assert settings.rank_model_server_url(3) == "http://127.0.0.1:8203"


async def test_encode_path_decodes_on_the_rank_it_arrived_on(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    encoder = await start_sim(zero_latency=True, role="encode", ec_connector="ec-nixl")
    engines = await contiguous(start_sim, RANKS, zero_latency=True, ec_connector="ec-nixl")
    sidecar = await start_sidecar(
        model_server_port=engines[0].port, data_parallel_size=RANKS, ec_connector="ec-nixl"
    )
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/dp.png"}}
    content = [{"type": "text", "text": "what is this? " * 4}, image]
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 2,
    }
    headers = {"x-encoder-hosts-ports": encoder.host_port}
    port = sidecar.servers.ports[2]
    async with client.post(
        f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers
    ) as resp:
        assert resp.status == 200, await resp.text()
    loads = [(await e.stats()).get("ec_loads_ok", 0) for e in engines]
    assert loads == [0, 0, 1]
    assert (await encoder.stats())["encodes"] == 1
