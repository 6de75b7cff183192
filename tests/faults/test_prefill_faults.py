"""The prefill leg fails: refused, 503 then recovered, hung, garbage, no KV params.

Each request goes client -> Envoy -> EPP (picks the prefill and decode pods) -> sidecar
-> prefill engine, then the local decode engine. The client must get an answer or a
clean JSON error within a deadline, and the engines must show what happened.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.conftest import FaultStack

pytestmark = [pytest.mark.faults, pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

PREFILL_TIMEOUT_S = 1.0
STACK = {
    "sidecar_args": [
        f"--prefill-timeout={PREFILL_TIMEOUT_S:g}s",
        "--prefill-retry-backoff=10ms",
        "--prefill-max-retries=3",
    ]
}
RETRIES = "pd_sidecar_prefill_retries_total"
FAILURES = "pd_sidecar_prefill_failures_total"


async def test_prefill_refusing_connections_is_a_clean_502(faults: FaultStack) -> None:
    await faults.process("prefill-engine-0").stop()
    retries = await faults.sidecar_sample(RETRIES, reason="connect")
    started = time.monotonic()
    try:
        async with asyncio.timeout(10), faults.post(faults.chat()) as resp:
            assert resp.status == 502
            error = (await resp.json())["error"]
    finally:
        await faults.restart("prefill-engine-0")
    assert error["stage"] == "prefill"
    assert "unreachable" in error["message"]
    assert error["request_id"]
    assert time.monotonic() - started < 5
    # The first attempt and three retries, then the error: counted once.
    assert await faults.sidecar_sample(RETRIES, reason="connect") == retries + 3
    assert await faults.sidecar_sample(FAILURES, reason="connect") >= 1
    assert (await faults.stats(faults.decode_url))["requests_total"] == 0
    await faults.assert_healthy()


async def test_prefill_503_twice_then_the_retry_succeeds(faults: FaultStack) -> None:
    await faults.arm(faults.prefill_url, kind="status", status=503, count=2, roles=["prefill"])
    retries = await faults.sidecar_sample(RETRIES, reason="status_503")
    async with asyncio.timeout(10), faults.post(faults.chat(max_tokens=5)) as resp:
        assert resp.status == 200
        reply = await resp.json()
    assert reply["usage"]["completion_tokens"] == 5
    assert await faults.sidecar_sample(RETRIES, reason="status_503") == retries + 2
    prefill = await faults.stats(faults.prefill_url)
    decode = await faults.stats(faults.decode_url)
    assert prefill["requests_by_role"]["prefill"] == 3
    assert prefill["kv_pulls_served"] == 1
    assert prefill["leases_active"] == 0
    assert decode["requests_by_role"]["decode"] == 1
    assert decode["kv_pulls_ok"] == 1
    assert decode["recomputes"] == 0
    await faults.assert_healthy()


async def test_prefill_hanging_past_its_timeout_is_504_and_aborted(faults: FaultStack) -> None:
    await faults.arm(faults.prefill_url, kind="hang", roles=["prefill"])
    started = time.monotonic()
    async with asyncio.timeout(PREFILL_TIMEOUT_S + 4), faults.post(faults.chat()) as resp:
        assert resp.status == 504
        error = (await resp.json())["error"]
    elapsed = time.monotonic() - started
    assert error["stage"] == "prefill"
    assert error["type"] == "timeout"
    assert PREFILL_TIMEOUT_S <= elapsed < PREFILL_TIMEOUT_S + 3
    prefill = await faults.wait_stats(
        faults.prefill_url, "prefill abort", lambda s: s["aborts"] == 1
    )
    assert prefill["requests_by_role"]["prefill"] == 1  # a timeout is not retried
    assert (await faults.stats(faults.decode_url))["requests_total"] == 0
    await faults.assert_healthy()


async def test_prefill_malformed_json_is_a_502(faults: FaultStack) -> None:
    await faults.arm(faults.prefill_url, kind="malformed_json", roles=["prefill"])
    async with asyncio.timeout(10), faults.post(faults.chat()) as resp:
        assert resp.status == 502
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert error["stage"] == "prefill"
    assert "malformed JSON" in error["message"]
    assert await faults.sidecar_sample(FAILURES, reason="malformed_answer") >= 1
    prefill = await faults.stats(faults.prefill_url)
    assert prefill["requests_by_role"]["prefill"] == 1  # garbage is not retried
    assert prefill["leases_active"] == 0
    assert (await faults.stats(faults.decode_url))["requests_total"] == 0
    await faults.assert_healthy()


async def test_prefill_without_kv_transfer_params_is_an_error(faults: FaultStack) -> None:
    await faults.arm(faults.prefill_url, kind="omit_kv_transfer_params", roles=["prefill"])
    failures = await faults.sidecar_sample(FAILURES, reason="missing_kv_transfer_params")
    async with asyncio.timeout(10), faults.post(faults.chat()) as resp:
        assert resp.status == 502
        error = (await resp.json())["error"]
    assert error["stage"] == "prefill"
    assert "kv_transfer_params" in error["message"]
    assert await faults.sidecar_sample(FAILURES, reason="missing_kv_transfer_params") == (
        failures + 1
    )
    prefill = await faults.stats(faults.prefill_url)
    assert prefill["requests_by_role"]["prefill"] == 1
    assert prefill["leases_active"] == 0  # no params advertised, no blocks pinned
    # No silent recompute on the decode engine.
    assert (await faults.stats(faults.decode_url))["requests_total"] == 0
    await faults.assert_healthy()


async def test_prefill_without_kv_transfer_params_falls_back_when_asked(
    faults: FaultStack,
) -> None:
    await faults.restart("sidecar-0", add=["--prefill-fallback=local"])
    try:
        await faults.arm(faults.prefill_url, kind="omit_kv_transfer_params", roles=["prefill"])
        async with asyncio.timeout(10), faults.post(faults.chat(max_tokens=4)) as resp:
            assert resp.status == 200
            assert resp.headers["x-pd-prefill-fallback"] == "missing_kv_transfer_params"
            reply = await resp.json()
        assert reply["usage"]["completion_tokens"] == 4
        fallbacks = "pd_sidecar_prefill_fallbacks_total"
        assert await faults.sidecar_sample(fallbacks, reason="missing_kv_transfer_params") == 1
        decode = await faults.stats(faults.decode_url)
        assert decode["requests_by_role"]["aggregated"] == 1  # computed locally, announced
        assert decode["kv_pulls_ok"] + decode["kv_pulls_failed"] == 0
        await faults.assert_healthy()
    finally:
        await faults.restart("sidecar-0", remove=["--prefill-fallback=local"])
