"""moriio: vLLM's MoRIIOConnector behind the sidecar, on simulated engines in MoRI-IO mode.

Read mode (the decode pulls), serial write mode (the prefill writes into the decode once
it notified) and parallel write mode (both legs at once, the decode answer held until
the prefill succeeded). The simulated transfers only work when the ``--moriio-*`` ports
and addresses reached the bodies: each hop goes where the bodies say.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.connectors.moriio import pick_dp_rank
from tests.conftest import eventually
from tests.sidecar.conftest import StartSidecar
from tests.sidecar_connectors.conftest import sse_events

PROMPT = "tell me about kv caches " * 8
TX = re.compile(r"^tx[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
CHAT = "/v1/chat/completions"


async def moriio_pd(
    start_sim: Any,
    start_sidecar: StartSidecar,
    mode: str,
    sim: dict[str, Any] | None = None,
    **flags: Any,
) -> tuple[Any, Any, Any]:
    p = await start_sim(zero_latency=True, moriio_mode=mode, **(sim or {}))
    d = await start_sim(zero_latency=True, moriio_mode=mode, **(sim or {}))
    flags.setdefault("kv_connector", "moriio")
    flags.setdefault("prefill_max_retries", 0)
    if mode == "write":
        flags.setdefault("moriio_write_mode", True)
        flags.setdefault("moriio_local_pod_ip", "127.0.0.1")
    # The simulator's side channel stands in for both MoRI-IO ports of an engine.
    flags.setdefault("moriio_decode_handshake_port", d.engine.side_channel_port)
    flags.setdefault("moriio_decode_notify_port", d.engine.side_channel_port)
    flags.setdefault("moriio_prefill_handshake_port", p.engine.side_channel_port)
    flags.setdefault("moriio_prefill_notify_port", p.engine.side_channel_port)
    sidecar = await start_sidecar(model_server_port=d.port, **flags)
    return p, d, sidecar


async def chat(
    client: aiohttp.ClientSession, sidecar: Any, p: Any, *, stream: bool = False
) -> tuple[int, str]:
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 5,
        "stream": stream,
    }
    headers = {"x-prefiller-host-port": p.host_port}
    async with client.post(f"{sidecar.url}{CHAT}", json=body, headers=headers) as resp:
        return resp.status, await resp.text()


def content(status: int, text: str, stream: bool) -> str:
    assert status == 200, text
    if not stream:
        import json

        return str(json.loads(text)["choices"][0]["message"]["content"])
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events[:-1]
        if isinstance(e, dict) and e.get("choices")
    )


def recorded(stats: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [r for r in stats["recorded"] if r["role"] == role]


def dp_header(record: dict[str, Any]) -> str | None:
    headers = {k.lower(): v for k, v in record["headers"].items()}
    return headers.get("x-data-parallel-rank")


async def test_read_mode_decode_pulls_with_nixl_v2_bodies(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    p, d, sidecar = await moriio_pd(start_sim, start_sidecar, "read")
    texts = [content(*await chat(client, sidecar, p, stream=s), s) for s in (False, True)]
    assert texts[0] == texts[1] and texts[0]
    p_stats, d_stats = await p.stats(), await d.stats()
    assert (d_stats["kv_pulls_ok"], d_stats["kv_pulls_failed"]) == (2, 0)
    assert p_stats["kv_pulls_served"] == 2
    for p_rec, d_rec in zip(recorded(p_stats, "prefill"), recorded(d_stats, "decode"), strict=True):
        assert p_rec["body"]["kv_transfer_params"] == {
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None,
        }  # fmt: skip
        d_ktp = d_rec["body"]["kv_transfer_params"]
        # The prefill's answer, verbatim: vLLM's MoRI-IO shape.
        assert d_ktp["remote_engine_id"] == f"127.0.0.1:{p.engine.side_channel_port}"
        assert d_ktp["remote_handshake_port"] == p.engine.side_channel_port
        assert dp_header(p_rec) is None and dp_header(d_rec) is None  # one DP rank


@pytest.mark.parametrize("connector", ["moriio", "nixlv2"])
async def test_serial_write_mode_prefill_writes_into_the_decode(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, connector: str
) -> None:
    """llm-d's spelling (nixlv2 with --moriio-write-mode) runs the same connector."""
    p, d, sidecar = await moriio_pd(
        start_sim, start_sidecar, "write", kv_connector=connector, moriio_tp_size=2
    )
    texts = [content(*await chat(client, sidecar, p, stream=s), s) for s in (False, True)]
    assert texts[0] == texts[1] and texts[0]
    p_stats, d_stats = await p.stats(), await d.stats()
    assert (d_stats["kv_pulls_ok"], d_stats["moriio_writes_received"]) == (2, 2)
    assert (p_stats["moriio_notifies"], p_stats["moriio_writes_sent"]) == (2, 2)
    assert p_stats["moriio_writes_failed"] == 0
    for p_rec, d_rec in zip(recorded(p_stats, "prefill"), recorded(d_stats, "decode"), strict=True):
        p_ktp = p_rec["body"]["kv_transfer_params"]
        assert TX.match(p_ktp["transfer_id"])
        assert p_ktp == {
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": "127.0.0.1", "remote_port": None,
            "remote_notify_port": d.engine.side_channel_port, "remote_dp_rank": 0,
            "remote_dp_rank_override": True,
            "remote_handshake_port": d.engine.side_channel_port,
            "transfer_id": p_ktp["transfer_id"], "tp_size": 2, "remote_dp_size": 1,
        }  # fmt: skip
        assert p_rec["body"]["max_tokens"] == 1 and p_rec["body"]["stream"] is False
        d_ktp = d_rec["body"]["kv_transfer_params"]
        # The prefill's answer: its own host and notify port, the same transfer.
        assert d_ktp["transfer_id"] == p_ktp["transfer_id"]
        assert d_ktp["remote_host"] == "127.0.0.1"
        assert d_ktp["remote_notify_port"] == p.engine.side_channel_port
        assert (d_ktp["remote_dp_rank"], d_ktp["remote_dp_rank_override"]) == (0, True)
        assert d_rec["body"]["max_tokens"] == 5


async def test_parallel_write_mode_builds_the_decode_leg_from_the_flags(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    p, d, sidecar = await moriio_pd(
        start_sim, start_sidecar, "write", moriio_parallel_dispatch=True
    )
    texts = [content(*await chat(client, sidecar, p, stream=s), s) for s in (False, True)]
    assert texts[0] == texts[1] and texts[0]
    p_stats, d_stats = await p.stats(), await d.stats()
    assert (d_stats["kv_pulls_ok"], d_stats["moriio_writes_received"]) == (2, 2)
    assert p_stats["moriio_writes_sent"] == 2
    port = p.engine.side_channel_port
    for p_rec, d_rec in zip(recorded(p_stats, "prefill"), recorded(d_stats, "decode"), strict=True):
        p_ktp, d_ktp = p_rec["body"]["kv_transfer_params"], d_rec["body"]["kv_transfer_params"]
        assert TX.match(d_ktp["transfer_id"]) and d_ktp["transfer_id"] == p_ktp["transfer_id"]
        assert d_ktp == {
            "do_remote_prefill": True, "do_remote_decode": False,
            "remote_engine_id": f"127.0.0.1:{port}", "remote_block_ids": [],
            "remote_host": "127.0.0.1", "remote_port": port, "remote_notify_port": port,
            "remote_dp_rank": 0, "remote_dp_rank_override": True,
            "remote_handshake_port": port, "transfer_id": d_ktp["transfer_id"],
            "tp_size": 1, "remote_dp_size": 1,
        }  # fmt: skip
        assert p_ktp["remote_handshake_port"] == d.engine.side_channel_port


@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_write_mode_answers_a_failed_prefill_not_the_decode(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, stream: bool
) -> None:
    """The decode leg is cancelled and its answer never reaches the client, even a stream:
    the client gets the prefill's failure as the status of the response."""
    p, d, sidecar = await moriio_pd(
        start_sim, start_sidecar, "write", moriio_parallel_dispatch=True
    )
    await p.add_fault(kind="status", status=400)
    status, text = await chat(client, sidecar, p, stream=stream)
    assert status == 400, text
    assert "data:" not in text  # nothing of the decode's stream

    async def decode_gave_up() -> bool:
        return (await d.stats())["aborts"] >= 1

    await eventually(decode_gave_up, "the decode leg to be cancelled")
    await p.add_fault(kind="status", status=503)
    status, text = await chat(client, sidecar, p, stream=stream)
    assert status == 502, text
    # Healthy again: the next request is served in full.
    assert content(*await chat(client, sidecar, p, stream=stream), stream)


async def held_pd(
    start_sim: Any, start_sidecar: StartSidecar, **flags: Any
) -> tuple[Any, Any, Any]:
    """Parallel dispatch in front of a decode engine that answers at once (no MoRI-IO:
    it computes the prompt itself), so only the sidecar's hold keeps its answer back."""
    p = await start_sim(zero_latency=True, moriio_mode="write")
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(
        model_server_port=d.port,
        kv_connector="moriio",
        prefill_max_retries=0,
        moriio_write_mode=True,
        moriio_parallel_dispatch=True,
        moriio_local_pod_ip="127.0.0.1",
        **flags,
    )
    return p, d, sidecar


async def test_parallel_write_mode_wait_timeout_fails_with_504(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    p, d, sidecar = await held_pd(start_sim, start_sidecar, moriio_parallel_decode_wait_timeout=0.5)
    await p.add_fault(kind="hang")
    started = time.monotonic()
    status, text = await chat(client, sidecar, p, stream=True)
    assert status == 504, text
    assert time.monotonic() - started < 8.0  # the 0.5 s bound, not the 300 s prefill timeout
    assert "KV" in text
    # The decode engine did answer (a stream), but nothing of it reached the client.
    assert (await d.stats())["requests_by_role"]["decode"] == 1
    assert "data:" not in text


async def test_parallel_write_mode_holds_the_decode_answer_until_the_prefill_failed(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    """A prefiller that fails after the decode answered: the client sees the failure."""
    slow_failure = web.Application()

    async def fail_late(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.3)
        return web.json_response({"error": "prefill broke"}, status=503)

    slow_failure.router.add_post(CHAT, fail_late)
    runner = web.AppRunner(slow_failure)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = int(runner.addresses[0][1])
        _, d, sidecar = await held_pd(start_sim, start_sidecar)
        body = {"model": "sim-model", "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 5, "stream": True}  # fmt: skip
        headers = {"x-prefiller-host-port": f"127.0.0.1:{port}"}
        async with client.post(f"{sidecar.url}{CHAT}", json=body, headers=headers) as resp:
            status, text = resp.status, await resp.text()
        assert status == 502, text
        assert "data:" not in text
        assert (await d.stats())["requests_by_role"]["decode"] == 1
    finally:
        await runner.cleanup()


async def test_data_parallel_ranks_pin_both_legs_and_wide_ep_hosts(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    """--moriio-dp-size 4: the prefill leg is pinned to the hashed rank, the decode leg to
    the rank the prefill reports; two pods of two ranks each name their hosts (a DNS
    name resolved at start)."""
    p, d, sidecar = await moriio_pd(
        start_sim,
        start_sidecar,
        "write",
        sim={"data_parallel_size": 4},
        moriio_dp_size=4,
        moriio_dp_size_local=2,
        moriio_remote_hosts="127.0.0.1,localhost",
        moriio_decode_hosts="localhost,127.0.0.1",
        moriio_dns_resolve_ttl=0.001,  # every request finds "localhost" stale
    )
    for _ in range(4):
        assert content(*await chat(client, sidecar, p), False)

    async def re_resolved() -> bool:
        return sidecar.sample("moriio_dns_reresolve_total") >= 1

    await eventually(re_resolved, "a request-path re-resolution of localhost")
    assert sidecar.sample("moriio_dns_ip_changed_total") == 0
    p_stats, d_stats = await p.stats(), await d.stats()
    assert d_stats["kv_pulls_ok"] == 4
    for p_rec, d_rec in zip(recorded(p_stats, "prefill"), recorded(d_stats, "decode"), strict=True):
        request_id = {k.lower(): v for k, v in p_rec["headers"].items()}["x-request-id"]
        rank = pick_dp_rank(request_id, 4)
        assert dp_header(p_rec) == dp_header(d_rec) == str(rank)
        p_ktp, d_ktp = p_rec["body"]["kv_transfer_params"], d_rec["body"]["kv_transfer_params"]
        assert (p_ktp["remote_dp_rank"], p_ktp["remote_dp_size"]) == (rank, 4)
        assert p_ktp["remote_hosts"] == ["127.0.0.1", "127.0.0.1"]
        assert p_ktp["remote_dp_size_local"] == 2
        assert (d_ktp["remote_dp_rank"], d_ktp["remote_dp_rank_override"]) == (rank, True)
        assert d_ktp["remote_dp_size"] == 4
        # The prefill engine answered with its own remote_hosts-free shape: filled in.
        assert d_ktp["remote_hosts"] == ["127.0.0.1", "127.0.0.1"]
        assert d_ktp["remote_dp_size_local"] == 2
    assert sum(p_stats["requests_by_dp_rank"].values()) == 4


async def test_parallel_dispatch_pins_both_legs_to_the_hashed_rank(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    p, d, sidecar = await moriio_pd(
        start_sim,
        start_sidecar,
        "write",
        sim={"data_parallel_size": 8},
        moriio_parallel_dispatch=True,
        moriio_dp_size=8,
    )
    for _ in range(3):
        assert content(*await chat(client, sidecar, p), False)
    p_stats, d_stats = await p.stats(), await d.stats()
    assert d_stats["kv_pulls_ok"] == 3
    by_id = {
        {k.lower(): v for k, v in r["headers"].items()}["x-request-id"]: r
        for r in recorded(d_stats, "decode")
    }
    for p_rec in recorded(p_stats, "prefill"):
        request_id = {k.lower(): v for k, v in p_rec["headers"].items()}["x-request-id"]
        rank = pick_dp_rank(request_id, 8)
        d_rec = by_id[request_id]
        assert dp_header(p_rec) == dp_header(d_rec) == str(rank)
        assert d_rec["body"]["kv_transfer_params"]["remote_dp_rank"] == rank
