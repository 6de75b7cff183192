"""The decode side fails: the KV pull (under each load-failure policy), or the decode
engine dies before its first byte or in the middle of a stream.

The client must get a clean error (JSON before the first byte, an SSE error event
after it) within a deadline, never a hang and never a response that looks complete.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import openai
import pytest

from tests.faults.conftest import FaultStack, read_sse
from vllm_sim.engine import PULL_PATH

pytestmark = [pytest.mark.faults, pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

LEASE_S = 1.0  # a stranded KV lease on the prefill engine is freed this soon
FIRST_BYTE_S = 1.0
STACK = {
    "sim_args": [f"--kv-lease-seconds={LEASE_S:g}"],
    "sidecar_args": [f"--decode-first-byte-timeout={FIRST_BYTE_S:g}s"],
}
RECOMPUTE = ["--kv-load-failure-policy", "recompute"]


async def _lease_freed(faults: FaultStack) -> dict[str, Any]:
    """The prefill engine's lease nobody pulled expires and frees its blocks."""
    return await faults.wait_stats(
        faults.prefill_url,
        "the stranded lease to expire",
        lambda s: s["leases_active"] == 0 and s["leases_expired"] == 1,
        timeout=LEASE_S + 5,
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_kv_pull_failure_under_the_fail_policy_is_a_client_error(
    faults: FaultStack, stream: bool
) -> None:
    await faults.arm(
        faults.prefill_url, kind="status", status=500, paths=[PULL_PATH], roles=["prefill"]
    )
    async with asyncio.timeout(10), faults.post(faults.chat(stream=stream)) as resp:
        if stream:
            reply = await read_sse(resp)
            assert reply.status == 200  # the decode engine's own stream, relayed
            errors = [json.loads(d)["error"] for d in reply.data if "error" in json.loads(d)]
            assert len(errors) == 1
            assert errors[0]["code"] == 500
            assert not reply.text  # no generated text before the error
        else:
            assert resp.status == 500
            assert (await resp.json())["error"]["code"] == 500
    decode = await faults.stats(faults.decode_url)
    assert decode["kv_pulls_failed"] == 1
    assert decode["kv_pulls_ok"] == 0
    assert decode["recomputes"] == 0
    prefill = await _lease_freed(faults)
    assert prefill["kv_pulls_served"] == 0
    await faults.assert_healthy()


async def test_decode_dropping_the_connection_before_the_first_byte_is_a_502(
    faults: FaultStack,
) -> None:
    await faults.arm(faults.decode_url, kind="disconnect", count=-1, roles=["decode"])
    stale = await faults.sidecar_sample("pd_sidecar_stale_connection_retries_total", stage="decode")
    async with asyncio.timeout(10), faults.post(faults.chat(stream=True)) as resp:
        assert resp.status == 502
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert error["stage"] == "decode"
    # A connection dropped before any answer is resent once (it may have been a stale
    # pooled one), then the error stands.
    decode = await faults.stats(faults.decode_url)
    assert decode["requests_by_role"]["decode"] == 2
    assert decode["kv_pulls_ok"] + decode["kv_pulls_failed"] == 0
    assert (
        await faults.sidecar_sample("pd_sidecar_stale_connection_retries_total", stage="decode")
        == stale + 1
    )
    await _lease_freed(faults)
    await faults.assert_healthy()


async def test_decode_hanging_before_the_first_byte_is_a_504_and_aborted(
    faults: FaultStack,
) -> None:
    await faults.arm(faults.decode_url, kind="hang", roles=["decode"])
    started = time.monotonic()
    async with asyncio.timeout(FIRST_BYTE_S + 4), faults.post(faults.chat(stream=True)) as resp:
        assert resp.status == 504
        error = (await resp.json())["error"]
    assert error["stage"] == "decode"
    assert error["type"] == "timeout"
    assert FIRST_BYTE_S <= time.monotonic() - started < FIRST_BYTE_S + 3
    decode = await faults.wait_stats(
        faults.decode_url, "the decode abort", lambda s: s["aborts"] == 1
    )
    assert decode["requests_by_role"]["decode"] == 1  # not resent
    prefill = await _lease_freed(faults)  # the KV it never pulled
    assert prefill["kv_pulls_served"] == 0
    await faults.assert_healthy()


async def test_decode_dying_mid_stream_ends_the_stream_with_an_error_event(
    faults: FaultStack,
) -> None:
    await faults.arm(faults.decode_url, kind="disconnect", after_chunks=3, roles=["decode"])
    broken = await faults.sidecar_sample(
        "pd_sidecar_requests_total", path="/v1/chat/completions", mode="pd", status="502"
    )
    async with asyncio.timeout(10), faults.post(faults.chat(max_tokens=16, stream=True)) as resp:
        reply = await read_sse(resp)
    assert reply.status == 200
    assert len(reply.data) == 3  # what the engine sent before it died
    assert reply.text  # some tokens did arrive ...
    assert not reply.done  # ... but the stream never claims to be complete
    [error] = reply.errors
    assert error["type"] == "error"
    assert error["error"]["stage"] == "decode"
    assert error["error"]["request_id"]
    decode = await faults.stats(faults.decode_url)
    assert decode["kv_pulls_ok"] == 1
    assert (await faults.stats(faults.prefill_url))["leases_active"] == 0
    assert (
        await faults.sidecar_sample(
            "pd_sidecar_requests_total", path="/v1/chat/completions", mode="pd", status="502"
        )
        == broken + 1
    )
    await faults.assert_healthy()


async def test_decode_only_answer_cut_mid_body_is_never_a_fake_success(
    faults: FaultStack,
) -> None:
    # A short prompt: the EPP sends it decode-only, and the sidecar streams the
    # engine's JSON answer through as it arrives.
    body = {"model": "sim-model", "prompt": "hi", "max_tokens": 8}
    await faults.arm(faults.decode_url, kind="truncate", roles=["aggregated"])
    async with asyncio.timeout(10), faults.post(body, "/v1/completions") as resp:
        if resp.status == 200:  # the first half went out: the client's read must fail
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        else:
            # Nothing reached the client: the sidecar saw the end with the first half,
            # or Envoy did while its response headers were still with the EPP.
            assert resp.status == 502
            error = (await resp.json())["error"]
            assert error.get("stage", "decode") == "decode", error
            assert error.get("type") in ("upstream_error", "gateway_error"), error
    decode = await faults.stats(faults.decode_url)
    assert decode["requests_by_role"]["aggregated"] == 1
    assert (await faults.stats(faults.prefill_url))["requests_total"] == 0
    await faults.assert_healthy()


async def test_pd_json_answer_cut_mid_body_is_a_502(faults: FaultStack) -> None:
    await faults.arm(faults.decode_url, kind="truncate", roles=["decode"])
    async with asyncio.timeout(10), faults.post(faults.chat()) as resp:
        assert resp.status == 502
        error = (await resp.json())["error"]
    assert error["stage"] == "decode"
    assert (await faults.stats(faults.decode_url))["kv_pulls_ok"] == 1
    await faults.assert_healthy()


@pytest.mark.parametrize("mode", ["pd", "decode-only"])
async def test_stream_cut_inside_an_event_never_relays_half_an_event(
    faults: FaultStack, mode: str
) -> None:
    if mode == "pd":
        body = faults.chat(max_tokens=16, stream=True)
        path, role = "/v1/chat/completions", "decode"
    else:  # a short prompt: the EPP sends it decode-only, the sidecar passes it through
        body = {"model": "sim-model", "prompt": "hi", "max_tokens": 16, "stream": True}
        path, role = "/v1/completions", "aggregated"
    await faults.arm(faults.decode_url, kind="truncate", after_chunks=2, roles=[role])
    async with asyncio.timeout(10), faults.post(body, path) as resp:
        reply = await read_sse(resp)
    assert reply.status == 200
    for data in reply.data:
        json.loads(data)  # every event the client got is whole
    assert len(reply.data) == 2
    assert not reply.done
    [error] = reply.errors
    assert error["error"]["stage"] == "decode"
    await faults.assert_healthy()


async def test_the_openai_client_raises_on_a_stream_cut_mid_way(faults: FaultStack) -> None:
    await faults.arm(faults.decode_url, kind="disconnect", after_chunks=2, roles=["decode"])
    body = faults.chat(max_tokens=16)
    pieces: list[str] = []
    async with openai.AsyncOpenAI(
        base_url=f"{faults.gateway}/v1", api_key="unused", max_retries=0
    ) as client:
        with pytest.raises(openai.APIError, match="upstream stream broken"):
            async with asyncio.timeout(10):
                stream = await client.chat.completions.create(
                    model=body["model"], messages=body["messages"], max_tokens=16, stream=True
                )
                async for chunk in stream:
                    pieces.extend(c.delta.content or "" for c in chunk.choices)
    assert len(pieces) <= 2
    await faults.assert_healthy()


async def test_kv_pull_failure_under_the_recompute_policy_recomputes(faults: FaultStack) -> None:
    await faults.restart("decode-engine-0", add=RECOMPUTE)
    try:
        await faults.arm(
            faults.prefill_url, kind="status", status=503, paths=[PULL_PATH], roles=["prefill"]
        )
        async with asyncio.timeout(10), faults.post(faults.chat(max_tokens=6)) as resp:
            assert resp.status == 200
            reply = await resp.json()
        assert reply["usage"]["completion_tokens"] == 6
        assert reply["choices"][0]["message"]["content"]
        decode = await faults.stats(faults.decode_url)
        assert decode["requests_by_role"]["decode"] == 1
        assert decode["kv_pulls_failed"] == 1
        assert decode["recomputes"] == 1
        prefill = await _lease_freed(faults)
        assert prefill["kv_pulls_served"] == 0
        await faults.assert_healthy()
    finally:
        await faults.restart("decode-engine-0", remove=RECOMPUTE)
