"""mooncake: a bootstrap /query per prefiller (cached, refreshed after a failure), then
concurrent legs with a shared transfer id (simulated Mooncake)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import eventually
from tests.sidecar.conftest import StartSidecar
from tests.sidecar_connectors.conftest import CountingProxy, sse_events

PROMPT = "tell me about kv caches " * 8
XFER = re.compile(r"^xfer-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


async def mooncake_pd(
    start_sim: Any,
    start_sidecar: StartSidecar,
    counting_proxy: Callable[[str], Awaitable[CountingProxy]],
    timeout: float = 3.0,
) -> tuple[Any, Any, Any, CountingProxy]:
    p = await start_sim(zero_latency=True, bootstrap_port=0, bootstrap_timeout_seconds=timeout)
    d = await start_sim(zero_latency=True, bootstrap_timeout_seconds=timeout)
    # The prefiller's bootstrap server, seen through a counter of /query calls.
    bootstrap = await counting_proxy(f"http://127.0.0.1:{p.bootstrap_port}")
    sidecar = await start_sidecar(
        model_server_port=d.port,
        kv_connector="mooncake",
        mooncake_bootstrap_port=bootstrap.port,
        prefill_max_retries=0,
    )
    return p, d, sidecar, bootstrap


async def test_mooncake_flow_query_once_then_refreshed_after_a_failure(
    start_sim: Any,
    start_sidecar: StartSidecar,
    counting_proxy: Callable[[str], Awaitable[CountingProxy]],
    client: aiohttp.ClientSession,
) -> None:
    p, d, sidecar, bootstrap = await mooncake_pd(start_sim, start_sidecar, counting_proxy)
    headers = {"x-prefiller-host-port": p.host_port}
    messages: Any = [{"role": "user", "content": PROMPT}]
    async with openai.AsyncOpenAI(
        base_url=f"{sidecar.url}/v1", api_key="unused", max_retries=0, default_headers=headers
    ) as oa:
        reply = await oa.chat.completions.create(model="sim-model", messages=messages, max_tokens=5)
        stream = await oa.chat.completions.create(
            model="sim-model", messages=messages, max_tokens=5, stream=True
        )
        chunks = [c async for c in stream]
    assert reply.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        reply.choices[0].message.content
    )
    assert bootstrap.calls["/query"] == 1  # cached for the prefiller
    d_stats = await d.stats()
    assert (d_stats["kv_pulls_ok"], d_stats["kv_pulls_failed"]) == (2, 0)
    assert (await p.stats())["kv_pulls_served"] == 2
    p_bodies = [r["body"] for r in (await p.stats())["recorded"]]
    d_bodies = [r["body"] for r in d_stats["recorded"]]
    for p_body, d_body in zip(p_bodies, d_bodies, strict=True):
        p_ktp, d_ktp = p_body["kv_transfer_params"], d_body["kv_transfer_params"]
        assert XFER.match(p_ktp["transfer_id"])
        assert p_ktp == {
            "do_remote_decode": True, "do_remote_prefill": False,
            "transfer_id": p_ktp["transfer_id"],
        }  # fmt: skip
        assert d_ktp == {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "transfer_id": p_ktp["transfer_id"],
            "remote_bootstrap_addr": f"http://127.0.0.1:{bootstrap.port}",
            "remote_engine_id": p.engine.config.engine_id,
        }
        assert p_body["max_tokens"] == 1 and p_body["stream"] is False
    assert (
        p_bodies[0]["kv_transfer_params"]["transfer_id"]
        != (p_bodies[1]["kv_transfer_params"]["transfer_id"])
    )
    assert d_bodies[1]["stream"] is True and d_bodies[1]["max_tokens"] == 5

    # A failed prefill forgets the bootstrap answer: the next request asks again.
    await p.add_fault(kind="status", status=503)
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 3}
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 502
        assert (await r.json())["error"]["stage"] == "prefill"
    async with client.post(
        sidecar.url + "/v1/completions", json={**body, "stream": True}, headers=headers
    ) as r:
        assert r.status == 200
        events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    assert bootstrap.calls["/query"] == 2
    assert (await d.stats())["kv_pulls_ok"] == 3


async def test_decode_failure_also_refreshes_the_bootstrap_answer(
    start_sim: Any,
    start_sidecar: StartSidecar,
    counting_proxy: Callable[[str], Awaitable[CountingProxy]],
    client: aiohttp.ClientSession,
) -> None:
    p, d, sidecar, bootstrap = await mooncake_pd(start_sim, start_sidecar, counting_proxy)
    headers = {"x-prefiller-host-port": p.host_port}
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 3}
    await d.add_fault(kind="status", status=500)
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 500
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200
    assert bootstrap.calls["/query"] == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_failed_prefill_ends_the_waiting_decode(
    start_sim: Any,
    start_sidecar: StartSidecar,
    counting_proxy: Callable[[str], Awaitable[CountingProxy]],
    client: aiohttp.ClientSession,
    stream: bool,
) -> None:
    p, d, sidecar, _ = await mooncake_pd(start_sim, start_sidecar, counting_proxy, timeout=5.0)
    await p.add_fault(kind="status", status=500)
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 4, "stream": stream}
    headers = {"x-prefiller-host-port": p.host_port}
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 502
        assert (await r.json())["error"]["stage"] == "prefill"

    async def decode_aborted() -> bool:
        return (await d.stats())["aborts"] == 1

    await eventually(decode_aborted, timeout=2.5, what="the decode leg aborted")
    assert (await d.stats())["kv_pulls_ok"] == 0


async def test_unreachable_bootstrap_server_is_502_prepare(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    from examples.local_stack.processes import free_port

    p = await start_sim(zero_latency=True)
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(
        model_server_port=d.port, kv_connector="mooncake", mooncake_bootstrap_port=free_port()
    )
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 3}
    headers = {"x-prefiller-host-port": p.host_port}
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 502
        error = (await r.json())["error"]
    assert error["stage"] == "prepare"
    assert (await p.stats())["requests_total"] == 0
    assert (await d.stats())["requests_total"] == 0
