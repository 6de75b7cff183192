"""No client body chooses where an engine connects: on every route and connector, a body
carrying kv_transfer_params, ec_transfer_params or SGLang's bootstrap_* fields is refused
with a 400 naming the field, and a recording server the body names hears nothing."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.sidecar.conftest import RunningSidecar, StartSidecar

PROMPT = "the river ran past the old mill at dawn " * 8


@dataclass
class Recorder:
    """A loopback server that records every request it gets, on any path."""

    port: int = 0
    seen: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()

    async def record(request: web.Request) -> web.Response:
        rec.seen.append(f"{request.method} {request.path}")
        return web.json_response({"token_ids": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rec.port = int(runner.addresses[0][1])
    try:
        yield rec
    finally:
        await runner.cleanup()


def hostile_fields(rec: Recorder) -> dict[str, dict[str, Any]]:
    """Each forbidden field, as a body fragment that points an engine at ``rec``."""
    nixl = {
        "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "x",
        "remote_request_id": "r", "remote_block_ids": [[0]], "remote_host": "127.0.0.1",
        "remote_port": rec.port, "remote_prefill_cached_tokens": 10_000,
    }  # fmt: skip
    encoder = {"peer_host": "127.0.0.1", "peer_port": rec.port, "size_bytes": 1,
               "nixl_agent_metadata_b64": ""}  # fmt: skip
    return {
        "kv_transfer_params": {"kv_transfer_params": nixl},
        "ec_transfer_params": {"ec_transfer_params": {"h": encoder}},
        "bootstrap_host": {"bootstrap_host": "127.0.0.1"},
        "bootstrap_port": {"bootstrap_port": rec.port},
        "bootstrap_room": {"bootstrap_room": 7},
        "vllm_xargs.kv_transfer_params": {"vllm_xargs": {"kv_transfer_params": "x"}},
    }


@dataclass
class Route:
    sidecar: RunningSidecar
    engines: list[Any]
    headers: dict[str, str]
    extra_body: dict[str, Any] = field(default_factory=dict)


async def _route(name: str, start_sim: Any, start_sidecar: StartSidecar) -> Route:
    if name in ("pd", "decode-only", "fallback"):
        p = await start_sim(zero_latency=True)
        d = await start_sim(zero_latency=True)
        sidecar = await start_sidecar(
            model_server_port=d.port, prefill_fallback="local" if name == "fallback" else "error"
        )
        headers = {} if name == "decode-only" else {"x-prefiller-host-port": p.host_port}
        if name == "fallback":
            await p.add_fault(kind="status", status=503, count=100)
        return Route(sidecar, [p, d], headers)
    if name == "e-pd":
        e = await start_sim(zero_latency=True, role="encode", ec_connector="ec-nixl")
        d = await start_sim(zero_latency=True, ec_connector="ec-nixl")
        sidecar = await start_sidecar(model_server_port=d.port, ec_connector="ec-nixl")
        return Route(sidecar, [e, d], {"x-encoder-hosts-ports": e.host_port})
    if name == "decode-first":
        p = await start_sim(zero_latency=True)
        d = await start_sim(zero_latency=True)
        sidecar = await start_sidecar(model_server_port=d.port, kv_connector="shared-storage")
        return Route(
            sidecar, [p, d], {"x-prefiller-host-port": p.host_port}, {"cache_hit_threshold": 0.5}
        )
    if name == "sglang":
        p = await start_sim(zero_latency=True, disaggregation_mode="prefill", bootstrap_port=0)
        d = await start_sim(zero_latency=True, disaggregation_mode="decode")
        sidecar = await start_sidecar(
            model_server_port=d.port, kv_connector="sglang", sglang_bootstrap_port=p.bootstrap_port
        )
        return Route(sidecar, [p, d], {"x-prefiller-host-port": p.host_port})
    assert name == "mooncake"
    p = await start_sim(zero_latency=True, bootstrap_port=0)
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(
        model_server_port=d.port, kv_connector="mooncake", mooncake_bootstrap_port=p.bootstrap_port
    )
    return Route(sidecar, [p, d], {"x-prefiller-host-port": p.host_port})


ROUTES = ["pd", "decode-only", "fallback", "e-pd", "decode-first", "sglang", "mooncake"]


@pytest.mark.parametrize("name", ROUTES)
async def test_a_body_naming_a_host_is_refused_and_the_host_hears_nothing(
    name: str,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    route = await _route(name, start_sim, start_sidecar)
    caplog.set_level(logging.WARNING)
    image = {"type": "image_url", "image_url": {"url": "http://img.example/a.png"}}
    content = [{"type": "text", "text": PROMPT}, image] if name == "e-pd" else PROMPT
    base = {"model": "sim-model", "messages": [{"role": "user", "content": content}],
            "max_tokens": 3, **route.extra_body}  # fmt: skip
    fields = hostile_fields(recorder)
    for field_name, fragment in fields.items():
        for stream in (False, True):
            body = {**base, **fragment, "stream": stream}
            headers = {**route.headers, "x-request-id": f"client-{field_name}"}
            async with client.post(
                route.sidecar.url + "/v1/chat/completions", json=body, headers=headers
            ) as resp:
                assert resp.status == 400, (field_name, await resp.text())
                error = (await resp.json())["error"]
            assert error["param"] == field_name
            assert error["type"] == "forbidden_field"
            assert field_name in error["message"]
        assert route.sidecar.sample(
            "pd_sidecar_forbidden_fields_total", field=field_name
        ) == 2  # fmt: skip
        assert f"client-{field_name}" in caplog.text  # logged with the client's id too
    assert recorder.seen == []
    for engine in route.engines:
        assert (await engine.stats())["requests_total"] == 0


async def test_trusted_clients_may_send_them_when_the_flag_says_so(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, recorder: Recorder
) -> None:
    # --allow-client-transfer-params: the body is the client's to decide, as documented;
    # the decode engine then connects where the body says (here: the recorder).
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port, allow_client_transfer_params=True)
    body = {"model": "sim-model", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 3, **hostile_fields(recorder)["kv_transfer_params"]}  # fmt: skip
    async with client.post(sidecar.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status in (200, 500)  # the recorder is no prefill engine
    assert recorder.seen == ["POST /sim/nixl/pull"]
    assert sidecar.sample("pd_sidecar_forbidden_fields_total", field="kv_transfer_params") == 0
