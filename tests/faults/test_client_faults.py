"""The client walks away: during the prefill, while the decode is starting, mid-stream,
and with both legs open at once (a concurrent connector).

The client's connection to Envoy closes; Envoy resets its stream to the sidecar, whose
handler is cancelled and closes whichever leg is open. The engines must see the abort
(so they stop working and free the request's blocks), no leg may start after the
client left, and the sidecar counts the request as 499.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.conftest import eventually
from tests.faults.conftest import FaultStack

pytestmark = [pytest.mark.faults, pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

LEASE_S = 1.0
ITL_MS = 20  # slow enough that a long stream is still running when the client leaves
SEQUENTIAL = {
    "zero_latency": False,
    "sim_args": [
        "--ttft-base-ms=0",
        "--prefill-ms-per-token=0",
        f"--itl-ms={ITL_MS}",
        f"--kv-lease-seconds={LEASE_S:g}",
    ],
}
# SGLang: the prefill and decode legs are sent at once and meet in a bootstrap room.
CONCURRENT = {"kv_connector": "sglang"}
STACKS = {"sequential": SEQUENTIAL, "concurrent": CONCURRENT}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests asking for ``concurrent`` run on the SGLang stack, the others on NIXL's."""
    name = "concurrent" if "concurrent" in metafunc.fixturenames else "sequential"
    metafunc.parametrize("fault_stack", [name], indirect=True, scope="module")


PATH = "/v1/chat/completions"


async def _left(faults: FaultStack) -> float:
    return await faults.sidecar_sample(
        "pd_sidecar_requests_total", path=PATH, mode="pd", status="499"
    )


async def _sidecar_settled(faults: FaultStack) -> None:
    async def idle() -> bool:
        return await faults.sidecar_sample("pd_sidecar_in_flight_requests") == 0

    await eventually(idle, "the sidecar to finish the abandoned request")


async def _leave_once(faults: FaultStack, body: dict[str, Any], url: str, what: str,
                      reached: Any, *also: tuple[str, str, Any]) -> None:  # fmt: skip
    """Send ``body`` on its own connection, wait until ``reached`` holds for the engine
    at ``url`` (and each ``(url, what, reached)`` of ``also``), then close the connection
    without reading the answer."""
    async with aiohttp.ClientSession() as own:
        request = asyncio.ensure_future(own.post(faults.gateway + PATH, json=body))
        try:
            await faults.wait_stats(url, what, reached)
            for other_url, other_what, other_reached in also:
                await faults.wait_stats(other_url, other_what, other_reached)
            assert not request.done(), "answered before the client left"
        finally:
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)


async def test_client_leaving_during_the_prefill_aborts_it_and_no_decode_starts(
    faults: FaultStack,
) -> None:
    await faults.arm(faults.prefill_url, kind="hang", roles=["prefill"])
    left = await _left(faults)
    await _leave_once(
        faults,
        faults.chat(),
        faults.prefill_url,
        "the prefill leg to arrive",
        lambda s: s["requests_by_role"]["prefill"] == 1,
    )
    prefill = await faults.wait_stats(
        faults.prefill_url, "the prefill abort", lambda s: s["aborts"] == 1
    )
    await _sidecar_settled(faults)
    assert prefill["leases_active"] == 0
    assert (await faults.stats(faults.decode_url))["requests_total"] == 0
    assert await _left(faults) == left + 1
    await faults.assert_healthy()


async def test_client_leaving_before_the_decode_answers_aborts_the_decode(
    faults: FaultStack,
) -> None:
    await faults.arm(faults.decode_url, kind="hang", roles=["decode"])
    left = await _left(faults)
    await _leave_once(
        faults,
        faults.chat(),
        faults.decode_url,
        "the decode leg to arrive",
        lambda s: s["requests_by_role"]["decode"] == 1,
    )
    await faults.wait_stats(faults.decode_url, "the decode abort", lambda s: s["aborts"] == 1)
    await _sidecar_settled(faults)
    # The prefill had finished; the KV it holds for the decode that never pulled it is
    # freed when the lease runs out.
    prefill = await faults.wait_stats(
        faults.prefill_url,
        "the stranded lease to expire",
        lambda s: s["leases_active"] == 0 and s["leases_expired"] == 1,
        timeout=LEASE_S + 5,
    )
    assert prefill["aborts"] == 0
    assert prefill["kv_pulls_served"] == 0
    assert await _left(faults) == left + 1
    await faults.assert_healthy()


async def test_client_leaving_mid_stream_aborts_the_decode(faults: FaultStack) -> None:
    left = await _left(faults)
    body = faults.chat(max_tokens=400, stream=True)  # 8 s of tokens at ITL_MS
    async with aiohttp.ClientSession() as own:
        async with asyncio.timeout(10):
            resp = await own.post(faults.gateway + PATH, json=body)
            assert resp.status == 200
            for _ in range(3):
                assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
        resp.close()  # the client goes away with the stream running
    decode = await faults.wait_stats(
        faults.decode_url, "the decode abort", lambda s: s["aborts"] == 1
    )
    await _sidecar_settled(faults)
    assert decode["kv_pulls_ok"] == 1
    prefill = await faults.stats(faults.prefill_url)
    assert prefill["aborts"] == 0  # long finished: the KV was pulled
    assert prefill["leases_active"] == 0
    assert await _left(faults) == left + 1
    await faults.assert_healthy()


# -- concurrent legs (SGLang): both legs are open at once, so both must be aborted ------


@pytest_asyncio.fixture(loop_scope="module")
async def concurrent(fault_stack: FaultStack) -> AsyncIterator[FaultStack]:
    """The SGLang stack (see ``pytest_generate_tests``), reset for this test."""
    await fault_stack.reset()
    yield fault_stack
    await fault_stack.clear_faults()


async def test_client_leaving_with_both_legs_open_aborts_both(concurrent: FaultStack) -> None:
    faults = concurrent
    # The prefill hangs; the decode leg, sent at the same time, waits for its KV.
    await faults.arm(faults.prefill_url, kind="hang", roles=["prefill"])
    left = await _left(faults)
    await _leave_once(
        faults,
        faults.chat(),
        faults.decode_url,
        "the decode leg to arrive",
        lambda s: s["requests_by_role"]["decode"] == 1,
        # Both legs are sent at once, but either may reach its engine first.
        (
            faults.prefill_url,
            "the prefill leg to arrive",
            lambda s: s["requests_by_role"]["prefill"] == 1,
        ),
    )
    await faults.wait_stats(faults.prefill_url, "the prefill abort", lambda s: s["aborts"] == 1)
    decode = await faults.wait_stats(
        faults.decode_url, "the decode abort", lambda s: s["aborts"] == 1
    )
    await _sidecar_settled(faults)
    assert decode["kv_pulls_ok"] + decode["kv_pulls_failed"] == 0
    assert (await faults.stats(faults.prefill_url))["requests_by_role"]["prefill"] == 1
    assert await _left(faults) == left + 1
    await faults.assert_healthy()
    # Nothing stays pinned on the prefill engine (the room handed the KV over).
    assert (await faults.stats(faults.prefill_url))["leases_active"] == 0
