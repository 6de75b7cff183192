"""Fault injection (control endpoint and flag) and abort accounting."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

CHAT = {"messages": [{"role": "user", "content": "hello there " * 20}], "max_tokens": 3}


async def wait_for(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_status_fault_fires_count_times_then_recovers(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    await sim.add_fault(kind="status", status=503, count=2)
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(f"{sim.url}/v1/chat/completions", json=CHAT) as resp:
                statuses.append(resp.status)
    assert statuses == [503, 503, 200]


async def test_fault_matches_role_and_path(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    await sim.add_fault(kind="status", status=500, count=-1, roles=["prefill"])
    await sim.add_fault(kind="status", status=502, count=-1, paths=["/v1/completions"])
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
        prefill = {**CHAT, "kv_transfer_params": {"do_remote_decode": True}}
        async with session.post(f"{sim.url}/v1/chat/completions", json=prefill) as resp:
            assert resp.status == 500
        async with session.post(f"{sim.url}/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 502
        await sim.clear_faults()
        async with session.post(f"{sim.url}/v1/chat/completions", json=prefill) as resp:
            assert resp.status == 200


async def test_malformed_json_and_omitted_params(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    await sim.add_fault(kind="malformed_json")
    await sim.add_fault(kind="omit_kv_transfer_params")
    prefill = {**CHAT, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/v1/chat/completions", json=prefill) as resp:
            assert resp.status == 200
            with pytest.raises(ValueError):
                await resp.json()
        async with session.post(f"{sim.url}/v1/chat/completions", json=prefill) as resp:
            body = await resp.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["kv_transfer_params"] is None
    assert (await sim.stats())["leases_active"] == 0


async def test_delay_fault(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    await sim.add_fault(kind="delay", delay_ms=300)
    async with aiohttp.ClientSession() as session:
        start = time.monotonic()
        async with session.post(f"{sim.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
        assert time.monotonic() - start >= 0.3


def no_server_errors(caplog: pytest.LogCaptureFixture) -> bool:
    """Injected faults are not the engine's own errors: nothing logged as one."""
    return not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _cut_stream(session: aiohttp.ClientSession, sim: Any) -> bytes:
    """What a streamed chat request received before the engine cut it."""
    received = b""
    with pytest.raises(aiohttp.ClientError):
        async with session.post(
            f"{sim.url}/v1/chat/completions", json={**CHAT, "stream": True}
        ) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                received += chunk
    return received


async def test_disconnect_before_first_byte_and_mid_stream(
    start_sim: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sim = await start_sim(zero_latency=True)
    await sim.add_fault(kind="disconnect")
    await sim.add_fault(kind="disconnect", after_chunks=2)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(f"{sim.url}/v1/chat/completions", json=CHAT) as resp:
                await resp.read()
        received = await _cut_stream(session, sim)
    assert received.count(b"data: ") == 2
    assert (await sim.stats())["aborts"] == 0  # the engine cut them, not the client
    assert no_server_errors(caplog)


async def test_truncate_cuts_a_json_answer_and_a_stream_mid_body(
    start_sim: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sim = await start_sim(zero_latency=True)
    await sim.add_fault(kind="truncate")
    await sim.add_fault(kind="truncate", after_chunks=2)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
            promised = resp.content_length
            assert promised is not None
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        received = await _cut_stream(session, sim)
    events = received.split(b"\n\n")
    assert len(events) == 3  # two whole events, then half of the third
    assert events[2].startswith(b"data: {")
    assert not events[2].endswith(b"}")
    assert (await sim.stats())["aborts"] == 0
    assert no_server_errors(caplog)


async def test_fault_from_flag_and_invalid_fault(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True, faults=('{"kind": "status", "status": 429}',))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 429
        async with session.post(f"{sim.url}/sim/faults", json={"kind": "explode"}) as resp:
            assert resp.status == 400


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_counts_as_abort(
    start_sim: Any, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    sim = await start_sim(itl_ms=50.0, ttft_base_ms=0)
    body = {**CHAT, "max_tokens": 200, "stream": stream}
    async with aiohttp.ClientSession() as session:
        if stream:
            resp = await session.post(f"{sim.url}/v1/chat/completions", json=body)
            await resp.content.readline()  # the stream is running
            resp.close()  # walk away mid-stream
        else:
            pending = asyncio.create_task(session.post(f"{sim.url}/v1/chat/completions", json=body))
            await wait_for(lambda: _running(sim), "the request to run")
            pending.cancel()  # walk away before the answer
            with pytest.raises(asyncio.CancelledError):
                await pending

    async def aborted() -> bool:
        return bool((await sim.stats())["aborts"] == 1)

    await wait_for(aborted, "the abort to be counted")
    assert sim.engine.running == 0
    assert no_server_errors(caplog)


async def test_hang_ends_when_client_leaves(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    await sim.add_fault(kind="hang")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(
                f"{sim.url}/v1/chat/completions",
                json=CHAT,
                timeout=aiohttp.ClientTimeout(total=0.3),
            ) as resp:
                await resp.read()

    async def aborted() -> bool:
        return bool((await sim.stats())["aborts"] == 1)

    await wait_for(aborted, "the hung request to be aborted")


async def _running(sim: Any) -> bool:
    return bool(sim.engine.running == 1)


async def _raw_get(port: int, path: str, timeout: float = 0.5) -> bytes | str:
    """One GET on its own connection, no client retries: the raw answer, or what
    happened instead ("dropped", "hangs")."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(timeout):
            answer = await reader.read()
        return answer or "dropped"
    except ConnectionResetError:
        return "dropped"
    except TimeoutError:
        return "hangs"
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        ({"kind": "status", "status": 503}, b"HTTP/1.1 503"),
        ({"kind": "malformed_json"}, b"\r\n\r\nvllm:num_requests_running{"),
        ({"kind": "disconnect"}, "dropped"),
        ({"kind": "hang"}, "hangs"),
    ],
    ids=["status", "garbage", "disconnect", "hang"],
)
async def test_metrics_faults_fire_only_when_they_name_the_path(
    start_sim: Any, caplog: pytest.LogCaptureFixture, fault: dict[str, Any], expect: bytes | str
) -> None:
    sim = await start_sim(zero_latency=True)
    await sim.add_fault(kind="status", status=500, count=-1)  # generation requests only
    await sim.add_fault(**fault, paths=["/metrics"])
    answer = await _raw_get(sim.port, "/metrics")
    if isinstance(expect, bytes):
        assert isinstance(answer, bytes) and expect in answer, answer
    else:
        assert answer == expect
    again = await _raw_get(sim.port, "/metrics")  # one shot, then served as usual
    assert isinstance(again, bytes) and again.startswith(b"HTTP/1.1 200"), again
    assert b"vllm:num_requests_running{" in again
    assert no_server_errors(caplog)
