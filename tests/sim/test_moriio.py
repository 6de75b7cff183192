"""The simulator's MoRIIOConnector stand-in, driven directly (no sidecar)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp

from tests.conftest import eventually
from tests.sim.test_connector_protocols import CHAT, post


def write_prefill(d: Any, transfer_id: str) -> dict[str, Any]:
    return {
        **CHAT,
        "max_tokens": 1,
        "kv_transfer_params": {
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": "127.0.0.1", "remote_port": None,
            "remote_notify_port": d.engine.side_channel_port,
            "remote_handshake_port": d.engine.side_channel_port, "remote_dp_rank": 0,
            "remote_dp_rank_override": True, "transfer_id": transfer_id, "tp_size": 1,
            "remote_dp_size": 1, "remote_hosts": ["127.0.0.1"], "remote_dp_size_local": 1,
            "some_future_field": {"ignored": True},
        },
    }  # fmt: skip


def write_decode(p: Any, transfer_id: str) -> dict[str, Any]:
    port = p.engine.side_channel_port
    return {
        **CHAT,
        "kv_transfer_params": {
            "do_remote_prefill": True, "do_remote_decode": False,
            "remote_engine_id": f"127.0.0.1:{port}", "remote_block_ids": [],
            "remote_host": "127.0.0.1", "remote_port": port, "remote_notify_port": port,
            "remote_handshake_port": port, "remote_dp_rank": 0, "remote_dp_rank_override": True,
            "transfer_id": transfer_id, "tp_size": 1, "remote_dp_size": 1,
        },
    }  # fmt: skip


async def test_write_mode_decode_first_then_prefill(start_sim: Any) -> None:
    """Parallel dispatch order: the decode notifies before the prefill computed anything;
    the write follows the prefill, and unknown fields are ignored as vLLM ignores them."""
    p = await start_sim(zero_latency=True, moriio_mode="write")
    d = await start_sim(zero_latency=True, moriio_mode="write")
    transfer_id = f"tx{uuid.uuid4()}"
    async with aiohttp.ClientSession() as session:
        decode = asyncio.ensure_future(post(session, d.url, write_decode(p, transfer_id)))

        async def notified() -> bool:
            return (await p.stats())["moriio_notifies"] == 1

        await eventually(notified, "the decode's notify")
        p_status, p_answer = await post(session, p.url, write_prefill(d, transfer_id))
        d_status, d_answer = await decode
    assert (p_status, d_status) == (200, 200), (p_answer, d_answer)
    ktp = p_answer["kv_transfer_params"]
    assert ktp["transfer_id"] == transfer_id
    assert ktp["remote_engine_id"] == f"127.0.0.1:{p.engine.side_channel_port}"
    assert (ktp["remote_dp_rank"], ktp["remote_dp_rank_override"]) == (0, True)
    assert d_answer["choices"][0]["finish_reason"] == "length"
    p_stats, d_stats = await p.stats(), await d.stats()
    assert (p_stats["moriio_writes_sent"], p_stats["moriio_writes_failed"]) == (1, 0)
    assert (d_stats["moriio_writes_received"], d_stats["kv_pulls_ok"]) == (1, 1)


async def test_write_mode_prefill_needs_a_transfer_id(start_sim: Any) -> None:
    p = await start_sim(zero_latency=True, moriio_mode="write")
    d = await start_sim(zero_latency=True, moriio_mode="write")
    body = write_prefill(d, "tx1")
    del body["kv_transfer_params"]["transfer_id"]
    async with aiohttp.ClientSession() as session:
        status, answer = await post(session, p.url, body)
    assert status == 400 and "transfer_id" in str(answer)


async def test_write_mode_without_a_write_fails_the_decode(start_sim: Any) -> None:
    """No prefill ever computes the transfer: the decode gives up after its pull timeout."""
    p = await start_sim(zero_latency=True, moriio_mode="write")
    d = await start_sim(zero_latency=True, moriio_mode="write", kv_pull_timeout_seconds=0.3)
    async with aiohttp.ClientSession() as session:
        status, _ = await post(session, d.url, write_decode(p, "tx-never"))
    assert status >= 500
    assert (await d.stats())["kv_pulls_failed"] == 1
    assert (await p.stats())["moriio_notifies"] == 1


async def test_read_mode_decode_pulls_from_the_handshake_port(start_sim: Any) -> None:
    p = await start_sim(zero_latency=True, moriio_mode="read")
    d = await start_sim(zero_latency=True, moriio_mode="read")
    prefill = {**CHAT, "max_tokens": 1, "kv_transfer_params": {
        "do_remote_decode": True, "do_remote_prefill": False, "transfer_id": "txR"}}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        _, answer = await post(session, p.url, prefill)
        ktp = answer["kv_transfer_params"]
        assert ktp["remote_handshake_port"] == p.engine.side_channel_port
        assert ktp["transfer_id"] == "txR" and ktp["remote_block_ids"]
        status, _ = await post(session, d.url, {**CHAT, "kv_transfer_params": ktp})
        assert status == 200
        # A second pull of the same blocks finds nothing: the lease was taken.
        status, _ = await post(session, d.url, {**CHAT, "kv_transfer_params": ktp})
        assert status >= 500
    assert (await p.stats())["kv_pulls_served"] == 1
    assert (await d.stats())["kv_pulls_ok"] == 1
