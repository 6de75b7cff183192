"""A prefill answer that arrives in many pieces is read whole (and relayed verbatim)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.sidecar.conftest import StartSidecar

PARAMS = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": [[1, 2]]}


@pytest.fixture
async def fake_engines() -> AsyncIterator[tuple[int, int, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def prefill(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"pad": "' + b"x" * (2 << 20) + b'",')
        await resp.write(b'"kv_transfer_params": {"do_remote_prefill": true, ')
        await resp.write(b'"remote_engine_id": "e", "remote_block_ids": [[1, 2]]}}')
        await resp.write_eof()
        return resp

    async def decode(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response({"ok": True})

    runners = []
    for handler in (prefill, decode):
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
    try:
        yield runners[0].addresses[0][1], runners[1].addresses[0][1], seen
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_prefill_answer_in_pieces(
    fake_engines: tuple[int, int, list[dict[str, Any]]],
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    p_port, d_port, seen = fake_engines
    sidecar = await start_sidecar(model_server_port=d_port)
    body = {"model": "m", "prompt": "hi", "max_tokens": 3}
    headers = {"x-prefiller-host-port": f"127.0.0.1:{p_port}"}
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
    assert seen == [{**body, "kv_transfer_params": PARAMS}]
