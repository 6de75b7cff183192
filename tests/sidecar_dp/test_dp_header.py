"""x-data-parallel-host-port: the decode leg goes to the rank the header names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import eventually
from tests.sidecar.conftest import StartSidecar

from .conftest import contiguous

RANKS = 3
BODY = {"model": "sim-model", "prompt": "data parallel", "max_tokens": 3}
DP = "x-data-parallel-host-port"


async def roles(sims: list[Any]) -> list[dict[str, int]]:
    """Requests each sim served, by role (roles it served none of left out)."""
    out = []
    for sim in sims:
        by_role = (await sim.stats())["requests_by_role"]
        out.append({role: n for role, n in by_role.items() if n})
    return out


async def test_header_sends_the_decode_leg_to_the_named_rank(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    engines = await contiguous(start_sim, RANKS, role="decode", zero_latency=True)
    prefill = await start_sim(role="prefill", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=engines[0].port, data_parallel_size=RANKS)
    ports = sidecar.servers.ports
    rank0 = f"http://127.0.0.1:{ports[0]}"
    named = {DP: f"127.0.0.1:{ports[2]}"}

    # P/D arriving on rank 0's port, naming rank 2: rank 2's engine decodes (pulls the KV).
    pd = {**named, "x-prefiller-host-port": prefill.host_port}
    async with client.post(rank0 + "/v1/completions", json=BODY, headers=pd) as resp:
        assert resp.status == 200, await resp.text()
    stream = {**BODY, "stream": True}
    async with client.post(rank0 + "/v1/completions", json=stream, headers=pd) as resp:
        assert resp.status == 200
        assert (await resp.read()).rstrip().endswith(b"data: [DONE]")
    # Decode-only (no prefill header) goes there too.
    async with client.post(rank0 + "/v1/completions", json=BODY, headers=named) as resp:
        assert resp.status == 200, await resp.text()
    # localhost names the same pod.
    other = {DP: f"localhost:{ports[1]}"}
    async with client.post(rank0 + "/v1/completions", json=BODY, headers=other) as resp:
        assert resp.status == 200, await resp.text()

    counts = await roles(engines)
    assert counts[0] == {}, counts
    assert counts[1] == {"aggregated": 1}, counts
    assert counts[2] == {"decode": 2, "aggregated": 1}, counts
    assert (await engines[2].stats())["kv_pulls_ok"] == 2
    assert (await roles([prefill])) == [{"prefill": 2}]
    # The header itself never reaches an engine.
    for engine in engines:
        for record in (await engine.stats())["recorded"]:
            assert DP not in {name.lower() for name in record["headers"]}


@pytest.mark.parametrize(
    "value",
    [
        "not a target",
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:{p1},127.0.0.1:{p2}",  # one rank, not a list
        "127.0.0.1:{free}",  # no rank of this sidecar serves that port
        "10.9.9.9:{p1}",  # another pod
    ],
)
async def test_invalid_or_unknown_rank_is_400(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, value: str
) -> None:
    engines = await contiguous(start_sim, RANKS, role="decode", zero_latency=True)
    prefill = await start_sim(role="prefill", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=engines[0].port, data_parallel_size=RANKS)
    ports = sidecar.servers.ports
    header = value.format(p1=ports[1], p2=ports[2], free=engines[0].port)
    for route in ({}, {"x-prefiller-host-port": prefill.host_port}):
        async with client.post(
            f"{sidecar.url}/v1/completions", json=BODY, headers={DP: header, **route}
        ) as resp:
            assert resp.status == 400, (header, await resp.text())
            assert DP in (await resp.json())["error"]["message"]
    assert await roles([*engines, prefill]) == [{}] * (RANKS + 1)


def write(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


async def test_ssrf_protection_checks_the_named_rank(
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    engines = await contiguous(start_sim, 2, role="decode", zero_latency=True)
    prefill = await start_sim(role="prefill", zero_latency=True)
    allow = tmp_path / "allow.json"
    member = {"host": "127.0.0.1", "ports": [prefill.port], "roles": ["prefill"]}
    write(allow, {"allow": [member]})
    sidecar = await start_sidecar(
        model_server_port=engines[0].port,
        data_parallel_size=2,
        enable_ssrf_protection=True,
        ssrf_allowlist_file=str(allow),
        ssrf_reload_interval=0.05,
    )
    ports = sidecar.servers.ports
    route = {"x-prefiller-host-port": prefill.host_port}

    async def post(dp: str) -> int:
        async with client.post(
            f"{sidecar.url}/v1/completions", json=BODY, headers={DP: dp, **route}
        ) as resp:
            await resp.read()
            return resp.status

    # The rank's port is not a target port of the pool: refused before any leg.
    assert await post(f"127.0.0.1:{ports[1]}") == 403
    # A host outside the pool is refused by SSRF protection (403), not looked up (400).
    assert await post(f"10.9.9.9:{ports[1]}") == 403
    assert await roles([*engines, prefill]) == [{}, {}, {}]
    assert (
        sidecar.sample(
            "pd_sidecar_ssrf_decisions_total",
            stage="data-parallel",
            decision="deny",
            rule="port-not-target-port",
        )
        == 1
    )

    # Once the pool lists the rank's port, the same request is served by rank 1.
    write(allow, {"allow": [{**member, "ports": [prefill.port, *ports]}]})

    async def allowed() -> bool:
        return await post(f"127.0.0.1:{ports[1]}") == 200

    await eventually(allowed, "the reloaded allowlist", timeout=30)
    counts = await roles(engines)
    assert counts[0] == {} and counts[1].get("decode", 0) >= 1, counts
