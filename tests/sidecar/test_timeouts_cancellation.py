"""Per-stage timeouts and client cancellation: legs aborted promptly, nothing left behind."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import aiohttp
import pytest

from tests.conftest import eventually
from tests.sidecar.conftest import StartSidecar

BODY = {"model": "sim-model", "prompt": "hello world " * 20, "max_tokens": 8}


async def _stack(start_sim: Any, start_sidecar: StartSidecar, decode: dict[str, Any] | None = None,
                 **settings: Any) -> tuple[Any, Any, Any]:  # fmt: skip
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode_sim = await start_sim(role="decode", **(decode or {"zero_latency": True}))
    sidecar = await start_sidecar(model_server_port=decode_sim.port, **settings)
    return prefill, decode_sim, sidecar


async def test_prefill_timeout_is_504_and_aborts_the_prefill(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    prefill, decode, sidecar = await _stack(start_sim, start_sidecar, prefill_timeout=0.3)
    await prefill.add_fault(kind="hang")
    headers = {"x-prefiller-host-port": prefill.host_port}
    async with client.post(sidecar.url + "/v1/completions", json=BODY, headers=headers) as resp:
        assert resp.status == 504
        error = (await resp.json())["error"]
    assert error["stage"] == "prefill"
    assert (await prefill.stats())["requests_total"] == 1  # a timeout is not retried

    async def aborted() -> bool:
        return (await prefill.stats())["aborts"] == 1

    await eventually(aborted, what="prefill abort")
    assert (await decode.stats())["requests_total"] == 0


async def test_decode_first_byte_timeout_is_504(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    prefill, decode, sidecar = await _stack(start_sim, start_sidecar, decode_first_byte_timeout=0.3)
    await decode.add_fault(kind="hang")
    headers = {"x-prefiller-host-port": prefill.host_port}
    async with client.post(sidecar.url + "/v1/completions", json=BODY, headers=headers) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["stage"] == "decode"

    async def aborted() -> bool:
        return (await decode.stats())["aborts"] == 1

    await eventually(aborted, what="decode abort")


async def test_idle_gap_inside_a_stream_ends_it_with_an_error_event(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    prefill, decode, sidecar = await _stack(
        start_sim,
        start_sidecar,
        decode={"itl_ms": 5000.0, "ttft_base_ms": 0.0, "prefill_ms_per_token": 0.0},
        stream_idle_timeout=0.3,
    )
    headers = {"x-prefiller-host-port": prefill.host_port}
    body = {**BODY, "stream": True}
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    last = [e for e in text.split("\n\n") if e.strip()][-1]
    assert last.startswith("event: error\n")
    error = json.loads(last.split("data: ", 1)[1])["error"]
    assert error["code"] == 504 and "idle" in error["message"]

    async def aborted() -> bool:
        return (await decode.stats())["aborts"] == 1

    await eventually(aborted, what="decode abort")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_client_disconnect_during_prefill_aborts_it(
    start_sim: Any, start_sidecar: StartSidecar
) -> None:
    prefill, decode, sidecar = await _stack(start_sim, start_sidecar)
    headers = {"x-prefiller-host-port": prefill.host_port}
    async with aiohttp.ClientSession() as warm:  # fill the pools once
        async with warm.post(sidecar.url + "/v1/completions", json=BODY, headers=headers) as r:
            assert r.status == 200
    await prefill.reset()
    await decode.reset()
    tasks_before = len(asyncio.all_tasks())
    fds_before = _open_fds()
    await prefill.add_fault(kind="hang")

    session = aiohttp.ClientSession()
    request = asyncio.ensure_future(
        session.post(sidecar.url + "/v1/completions", json=BODY, headers=headers)
    )

    async def prefill_reached() -> bool:
        return (await prefill.stats())["requests_total"] == 1

    await eventually(prefill_reached, what="prefill leg sent")
    request.cancel()
    await session.close()

    async def prefill_aborted() -> bool:
        return (await prefill.stats())["aborts"] == 1

    await eventually(prefill_aborted, what="prefill abort")

    async def settled() -> bool:
        in_flight = sidecar.sample("pd_sidecar_in_flight_requests")
        return in_flight == 0 and len(asyncio.all_tasks()) <= tasks_before

    await eventually(settled, what="no request task left")
    assert (await decode.stats())["requests_total"] == 0
    assert (
        sidecar.sample("pd_sidecar_requests_total", path="/v1/completions", mode="pd", status="499")
        == 1
    )

    async def fds_released() -> bool:
        return _open_fds() <= fds_before

    await eventually(fds_released, what="file descriptors released")


async def test_client_disconnect_mid_stream_aborts_the_decode(
    start_sim: Any, start_sidecar: StartSidecar
) -> None:
    prefill, decode, sidecar = await _stack(
        start_sim,
        start_sidecar,
        decode={"itl_ms": 50.0, "ttft_base_ms": 0.0, "prefill_ms_per_token": 0.0},
    )
    headers = {"x-prefiller-host-port": prefill.host_port}
    body = {**BODY, "max_tokens": 500, "stream": True}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(sidecar.url + "/v1/completions", json=body, headers=headers)
        assert resp.status == 200
        assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
        resp.close()  # the client goes away mid-stream

    async def decode_aborted() -> bool:
        return (await decode.stats())["aborts"] == 1

    await eventually(decode_aborted, what="decode abort")

    async def settled() -> bool:
        return sidecar.sample("pd_sidecar_in_flight_requests") == 0

    await eventually(settled, what="request finished")
    assert (await prefill.stats())["aborts"] == 0
    assert (
        sidecar.sample("pd_sidecar_requests_total", path="/v1/completions", mode="pd", status="499")
        == 1
    )


async def test_client_leaving_with_concurrent_legs_open_aborts_both_as_499(
    start_sim: Any, start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    # SGLang's legs run at once: the prefill hangs, the decode waits in its room.
    prefill = await start_sim(
        role="prefill", zero_latency=True, disaggregation_mode="prefill", bootstrap_port=0
    )
    decode = await start_sim(role="decode", zero_latency=True, disaggregation_mode="decode")
    sidecar = await start_sidecar(
        model_server_port=decode.port,
        kv_connector="sglang",
        sglang_bootstrap_port=prefill.bootstrap_port,
    )
    await prefill.add_fault(kind="hang")
    headers = {"x-prefiller-host-port": prefill.host_port}
    caplog.set_level(logging.WARNING)
    session = aiohttp.ClientSession()
    request = asyncio.ensure_future(
        session.post(sidecar.url + "/v1/completions", json=BODY, headers=headers)
    )

    async def both_legs_sent() -> bool:
        p, d = await prefill.stats(), await decode.stats()
        return bool(p["requests_total"] == 1 and d["requests_total"] == 1)

    await eventually(both_legs_sent, what="both legs sent")
    request.cancel()
    await session.close()

    async def both_aborted() -> bool:
        p, d = await prefill.stats(), await decode.stats()
        return bool(p["aborts"] == 1 and d["aborts"] == 1)

    await eventually(both_aborted, what="both legs aborted")

    async def settled() -> bool:
        return sidecar.sample("pd_sidecar_in_flight_requests") == 0

    await eventually(settled, what="request finished")
    assert (
        sidecar.sample("pd_sidecar_requests_total", path="/v1/completions", mode="pd", status="499")
        == 1
    )
    ours = [r for r in caplog.records if r.name.startswith("pd_sidecar")]
    assert not [r.getMessage() for r in ours if r.levelno >= logging.ERROR]
