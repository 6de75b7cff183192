"""The orchestrator's concurrent-leg contract (what sglang and mooncake will use), proven
with a minimal connector declared here: both legs start together, and a failed prefill
ends the decode leg with an error instead of leaving it waiting."""

from __future__ import annotations

from typing import Any, ClassVar

import aiohttp
import pytest

import sidecar.connectors as connectors
from sidecar.connectors import Connector, LegContext, LegOrder, PrefillResult
from tests.conftest import eventually
from tests.sidecar.conftest import StartSidecar


class ConcurrentProbe(Connector):
    name: ClassVar[str] = "concurrent-probe"
    order: ClassVar[LegOrder] = LegOrder.CONCURRENT

    def prefill_body(self, ctx: LegContext) -> dict[str, Any]:
        return {**ctx.body, "stream": False, "max_tokens": 1,
                "kv_transfer_params": {"do_remote_decode": True}}  # fmt: skip

    def read_prefill(self, ctx: LegContext, payload: object) -> PrefillResult:
        return PrefillResult(transfer_params=None)

    def decode_body(self, ctx: LegContext, prefill: PrefillResult | None) -> dict[str, Any]:
        assert prefill is None
        return {**ctx.body, "room": ctx.request_id}


@pytest.fixture
def probe_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(connectors._REGISTRY, ConcurrentProbe.name, ConcurrentProbe)


BODY = {"model": "sim-model", "prompt": "hello " * 20, "max_tokens": 5}


@pytest.mark.usefixtures("probe_registered")
async def test_concurrent_legs(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port, kv_connector="concurrent-probe")
    headers = {"x-prefiller-host-port": prefill.host_port, "x-request-id": "room-1"}
    async with client.post(sidecar.url + "/v1/completions", json=BODY, headers=headers) as resp:
        assert resp.status == 200
    assert (await prefill.stats())["requests_by_role"]["prefill"] == 1
    d_stats = await decode.stats()
    leg_id = d_stats["recorded"][0]["headers"]["x-request-id"]
    assert leg_id != "room-1"  # the legs get a fresh id, never the client's
    assert d_stats["recorded"][0]["body"] == {**BODY, "room": leg_id}

    # A failing prefill ends a decode that would otherwise wait forever.
    await prefill.add_fault(kind="status", status=500)
    await decode.add_fault(kind="hang")
    async with client.post(sidecar.url + "/v1/completions", json=BODY, headers=headers) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["stage"] == "prefill"

    async def decode_aborted() -> bool:
        return (await decode.stats())["aborts"] == 1

    await eventually(decode_aborted, what="decode leg aborted")


async def test_prefill_failing_mid_stream_ends_the_stream_with_an_error_event(
    probe_registered: None, start_sim: Any, start_sidecar: StartSidecar
) -> None:
    import asyncio

    from aiohttp import web

    release = asyncio.Event()

    async def failing_prefill(request: web.Request) -> web.Response:
        await request.read()
        await release.wait()
        return web.json_response({"error": "bootstrap failed"}, status=500)

    app = web.Application()
    app.router.add_post("/v1/completions", failing_prefill)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        decode = await start_sim(role="decode", itl_ms=20.0, ttft_base_ms=0.0)
        sidecar = await start_sidecar(
            model_server_port=decode.port, kv_connector="concurrent-probe"
        )
        headers = {"x-prefiller-host-port": f"127.0.0.1:{runner.addresses[0][1]}"}
        body = {**BODY, "max_tokens": 500, "stream": True}
        async with aiohttp.ClientSession() as session:
            resp = await session.post(sidecar.url + "/v1/completions", json=body, headers=headers)
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
            release.set()
            rest = (await resp.content.read()).decode()
        last = [e for e in rest.split("\n\n") if e.strip()][-1]
        assert last.startswith("event: error\n")
        assert '"stage": "prefill"' in last

        async def decode_aborted() -> bool:
            return (await decode.stats())["aborts"] == 1

        await eventually(decode_aborted, what="decode leg aborted")
    finally:
        await runner.cleanup()
