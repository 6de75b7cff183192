"""The per-prefiller preparation step (what mooncake's bootstrap /query will use): run
once per prefiller, shared by concurrent requests, forgotten when a prefill fails."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import aiohttp
import pytest

import sidecar.connectors as connectors
from sidecar.connectors import LegContext
from sidecar.connectors.nixlv2 import NixlV2Connector
from sidecar.routing import HostPort
from tests.sidecar.conftest import StartSidecar

PREPARED: list[str] = []
FAIL_NEXT: list[bool] = []


class PreparingNixl(NixlV2Connector):
    name: ClassVar[str] = "preparing-probe"

    async def prepare(self, prefiller: HostPort, session: aiohttp.ClientSession) -> object:
        PREPARED.append(prefiller.authority)
        if FAIL_NEXT and FAIL_NEXT.pop():
            raise OSError("bootstrap server unreachable")
        await asyncio.sleep(0)  # a real connector awaits a bootstrap query here
        return {"bootstrap": prefiller.authority}

    def prefill_body(self, ctx: LegContext) -> dict[str, Any]:
        assert ctx.prepared == {"bootstrap": ctx.prefiller.authority}
        return super().prefill_body(ctx)


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    PREPARED.clear()
    FAIL_NEXT.clear()
    monkeypatch.setitem(connectors._REGISTRY, PreparingNixl.name, PreparingNixl)


@pytest.mark.usefixtures("registered")
async def test_prepare_cached_per_prefiller_and_refreshed_after_failure(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(
        model_server_port=decode.port, kv_connector="preparing-probe", prefill_max_retries=0
    )
    headers = {"x-prefiller-host-port": prefill.host_port}
    body = {"model": "sim-model", "prompt": "hello " * 10, "max_tokens": 2}

    async def one() -> int:
        async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
            await r.read()
            return r.status

    assert await asyncio.gather(*(one() for _ in range(5))) == [200] * 5
    assert [prefill.host_port] == PREPARED  # once, shared by concurrent requests
    await prefill.add_fault(kind="status", status=503)
    assert await one() == 502
    assert await one() == 200
    assert [prefill.host_port, prefill.host_port] == PREPARED  # refreshed after the failure
    assert (await decode.stats())["kv_pulls_ok"] == 6


@pytest.mark.usefixtures("registered")
async def test_failed_preparation_is_502_naming_the_stage_then_retried(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port, kv_connector="preparing-probe")
    headers = {"x-prefiller-host-port": prefill.host_port}
    body = {"model": "sim-model", "prompt": "hello", "max_tokens": 2}
    FAIL_NEXT.append(True)
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 502
        error = (await r.json())["error"]
    assert error["stage"] == "prepare" and "bootstrap server unreachable" in error["message"]
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200
    assert len(PREPARED) == 2
