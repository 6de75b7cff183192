"""SGLang rendezvous, Mooncake transfers, shared storage and encoder outputs."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from vllm_sim.tokens import mm_hash

CHAT = {"messages": [{"role": "user", "content": "tell me about kv caches " * 8}], "max_tokens": 4}
PATH = "/v1/chat/completions"


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(f"{url}{PATH}", json=body) as resp:
        return resp.status, await resp.json()


# -- SGLang -------------------------------------------------------------------------


async def sglang_pair(start_sim: Any, timeout: float = 10.0) -> tuple[Any, Any]:
    p = await start_sim(
        zero_latency=True, disaggregation_mode="prefill", bootstrap_port=0,
        bootstrap_timeout_seconds=timeout,
    )  # fmt: skip
    d = await start_sim(
        zero_latency=True, disaggregation_mode="decode", bootstrap_timeout_seconds=timeout
    )
    return p, d


def sglang_body(p: Any, room: int) -> dict[str, Any]:
    return {
        **CHAT,
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": p.bootstrap_port,
        "bootstrap_room": room,
    }


async def test_sglang_concurrent_legs_rendezvous(start_sim: Any) -> None:
    p, d = await sglang_pair(start_sim)
    body = sglang_body(p, 12345)
    async with aiohttp.ClientSession() as session:
        (p_status, _), (d_status, d_out) = await asyncio.gather(
            post(session, p.url, body), post(session, d.url, body)
        )
    assert (p_status, d_status) == (200, 200)
    assert d_out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # local hits only
    p_stats = await p.stats()
    assert p_stats["kv_pulls_served"] == 1
    assert p_stats["leases_active"] == 0  # handed over in the room: no NIXL lease pinned
    d_stats = await d.stats()
    assert d_stats["kv_pulls_ok"] == 1
    assert d_stats["requests_by_role"]["decode"] == 1


@pytest.mark.parametrize("alone", ["prefill", "decode"])
async def test_sglang_each_side_times_out_alone(start_sim: Any, alone: str) -> None:
    p, d = await sglang_pair(start_sim, timeout=0.3)
    target = p if alone == "prefill" else d
    async with aiohttp.ClientSession() as session:
        status, out = await post(session, target.url, sglang_body(p, 7))
    assert status == 500
    assert "room" in out["error"]["message"] or "KV" in out["error"]["message"]
    assert (await p.stats())["bootstrap_timeouts"] == 1


async def test_sglang_mismatched_rooms_fail_both(start_sim: Any) -> None:
    p, d = await sglang_pair(start_sim, timeout=0.3)
    async with aiohttp.ClientSession() as session:
        (p_status, _), (d_status, _) = await asyncio.gather(
            post(session, p.url, sglang_body(p, 1)), post(session, d.url, sglang_body(p, 2))
        )
    assert (p_status, d_status) == (500, 500)


async def test_sglang_missing_bootstrap_host_is_400(start_sim: Any) -> None:
    _, d = await sglang_pair(start_sim)
    async with aiohttp.ClientSession() as session:
        status, out = await post(session, d.url, {**CHAT, "bootstrap_room": 3})
    assert status == 400
    assert "bootstrap_host" in out["error"]["message"]


# -- Mooncake -------------------------------------------------------------------------


async def test_mooncake_query_and_concurrent_transfer(start_sim: Any) -> None:
    p = await start_sim(zero_latency=True, bootstrap_port=0, bootstrap_timeout_seconds=1.0)
    d = await start_sim(zero_latency=True)
    bootstrap = f"http://127.0.0.1:{p.bootstrap_port}"
    transfer_id = f"xfer-{uuid.uuid4()}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{bootstrap}/query") as resp:
            engine_id = (await resp.json())["0"]["engine_id"]
        p_body = {
            **CHAT,
            "max_tokens": 1,
            "kv_transfer_params": {
                "do_remote_decode": True, "do_remote_prefill": False, "transfer_id": transfer_id,
            },
        }  # fmt: skip
        d_params = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "transfer_id": transfer_id,
            "remote_bootstrap_addr": bootstrap,
            "remote_engine_id": engine_id,
        }
        # The decode leg may arrive first: it waits for the prefill to publish.
        d_task = asyncio.create_task(post(session, d.url, {**CHAT, "kv_transfer_params": d_params}))
        p_status, _ = await post(session, p.url, p_body)
        d_status, d_out = await d_task
        # A transfer is taken once.
        again, _ = await post(session, d.url, {**CHAT, "kv_transfer_params": d_params})
    assert engine_id == p.engine.config.engine_id
    assert (await p.stats())["bootstrap_queries"] == 1
    assert (p_status, d_status, again) == (200, 200, 500)
    assert d_out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # local hits only
    d_stats = await d.stats()
    assert (d_stats["kv_pulls_ok"], d_stats["kv_pulls_failed"]) == (1, 1)


async def test_mooncake_wrong_engine_id_fails(start_sim: Any) -> None:
    p = await start_sim(zero_latency=True, bootstrap_port=0)
    d = await start_sim(zero_latency=True)
    params = {
        "do_remote_prefill": True,
        "transfer_id": "xfer-1",
        "remote_bootstrap_addr": f"http://127.0.0.1:{p.bootstrap_port}",
        "remote_engine_id": "not-this-one",
    }
    async with aiohttp.ClientSession() as session:
        status, _ = await post(session, d.url, {**CHAT, "kv_transfer_params": params})
    assert status == 500
    assert (await p.stats())["kv_pulls_rejected"] == 1


# -- shared storage ----------------------------------------------------------------------


async def test_shared_storage_serves_another_engines_prefix(start_sim: Any, tmp_path: Path) -> None:
    a = await start_sim(zero_latency=True, shared_storage_path=str(tmp_path))
    b = await start_sim(zero_latency=True, shared_storage_path=str(tmp_path))
    async with aiohttp.ClientSession() as session:
        _, first = await post(session, a.url, {**CHAT, "max_tokens": 1})
        _, second = await post(session, b.url, CHAT)
    n = second["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == n // 16 * 16
    assert (await b.stats())["storage_hit_tokens"] == n // 16 * 16


async def test_cache_hit_threshold_decode_first(start_sim: Any, tmp_path: Path) -> None:
    d = await start_sim(zero_latency=True, shared_storage_path=str(tmp_path))
    p = await start_sim(zero_latency=True, shared_storage_path=str(tmp_path))
    decode_first = {**CHAT, "cache_hit_threshold": 0.5}
    async with aiohttp.ClientSession() as session:
        status, miss = await post(session, d.url, decode_first)
        await post(session, p.url, {**CHAT, "max_tokens": 1})
        _, hit = await post(session, d.url, decode_first)
    assert status == 200
    assert miss["choices"][0]["finish_reason"] == "cache_threshold"
    assert miss["usage"]["completion_tokens"] == 0
    # Declined before computing: the decline left nothing in the local cache, so the
    # second attempt's hit came from the shared storage.
    assert (await d.stats())["storage_hit_tokens"] == hit["usage"]["prompt_tokens"] // 16 * 16
    assert hit["choices"][0]["finish_reason"] == "length"
    assert (await d.stats())["cache_threshold_rejections"] == 1


# -- encoder outputs -------------------------------------------------------------------------

IMAGE = "https://example.invalid/cat.png"


def mm_chat(*urls: str, **extra: Any) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "describe"}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 2, **extra}


async def test_ec_nixl_encoder_params_feed_prefill(start_sim: Any) -> None:
    e = await start_sim(zero_latency=True, role="encode", ec_connector="ec-nixl")
    p = await start_sim(zero_latency=True, ec_connector="ec-nixl")
    async with aiohttp.ClientSession() as session:
        status, enc = await post(session, e.url, mm_chat(IMAGE, max_tokens=1))
        params = enc["ec_transfer_params"]
        ok, _ = await post(session, p.url, mm_chat(IMAGE, IMAGE, ec_transfer_params=params))
        missing, err = await post(session, p.url, mm_chat(IMAGE))
        key = mm_hash(f"image_url:{IMAGE}")
        bad = {key: {**params[key], "size_bytes": 1}}
        wrong, _ = await post(session, p.url, mm_chat(IMAGE, ec_transfer_params=bad))
        text_only, _ = await post(session, p.url, CHAT)
    assert status == 200
    assert set(params) == {key}
    assert {"peer_host", "peer_port", "size_bytes", "nixl_agent_metadata_b64"} <= set(params[key])
    assert (ok, missing, wrong, text_only) == (200, 500, 500, 200)
    assert key in err["error"]["message"]
    p_stats = await p.stats()
    assert (p_stats["ec_loads_ok"], p_stats["ec_loads_failed"]) == (1, 2)
    assert (await e.stats())["encodes"] == 1


async def test_ec_example_goes_through_shared_storage(start_sim: Any, tmp_path: Path) -> None:
    e = await start_sim(
        zero_latency=True,
        role="encode",
        ec_connector="ec-example",
        shared_storage_path=str(tmp_path),
    )
    d = await start_sim(
        zero_latency=True, ec_connector="ec-example", shared_storage_path=str(tmp_path)
    )
    async with aiohttp.ClientSession() as session:
        before, _ = await post(session, d.url, mm_chat(IMAGE))
        _, enc = await post(session, e.url, mm_chat(IMAGE, max_tokens=1))
        after, _ = await post(session, d.url, mm_chat(IMAGE))
        two_items, _ = await post(session, e.url, mm_chat(IMAGE, "https://example.invalid/dog.png"))
    assert "ec_transfer_params" not in enc
    assert (before, after, two_items) == (500, 200, 400)
