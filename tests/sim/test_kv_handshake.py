"""The NIXL handshake: leases, exactly-once pulls, and the load-failure policies."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import pytest

from vllm_sim.engine import PULL_PATH
from vllm_sim.tokens import chat_prompt, output_token_ids, tokenize

MESSAGES = [{"role": "user", "content": "Summarise the history of paged attention. " * 12}]
PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


async def prefill(session: aiohttp.ClientSession, sim: Any, **extra: Any) -> dict[str, Any]:
    body = {"messages": MESSAGES, "max_tokens": 1, "kv_transfer_params": PREFILL_PARAMS, **extra}
    async with session.post(f"{sim.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        result: dict[str, Any] = await resp.json()
        return result


async def decode(
    session: aiohttp.ClientSession, sim: Any, params: dict[str, Any], **extra: Any
) -> tuple[int, dict[str, Any]]:
    body = {"messages": MESSAGES, "max_tokens": 4, "kv_transfer_params": params, **extra}
    async with session.post(f"{sim.url}/v1/chat/completions", json=body) as resp:
        return resp.status, await resp.json()


async def test_prefill_returns_params_and_one_pull_succeeds(start_sim: Any) -> None:
    p = await start_sim(zero_latency=True)
    d = await start_sim(zero_latency=True)
    n_prompt = len(tokenize(chat_prompt(MESSAGES)))
    async with aiohttp.ClientSession() as session:
        pre = await prefill(session, p)
        params = pre["kv_transfer_params"]
        assert params["do_remote_prefill"] is True
        assert params["do_remote_decode"] is False
        assert params["remote_engine_id"] == p.engine.config.engine_id
        assert params["remote_host"] == "127.0.0.1"
        # The side channel has its own port, as NIXL's does: never the HTTP port.
        assert params["remote_port"] == p.engine.side_channel_port != p.port
        async with session.post(f"{p.url}{PULL_PATH}", json={}) as resp:
            assert resp.status == 404
        assert params["tp_size"] == 1
        [block_ids] = params["remote_block_ids"]  # one KV-cache group
        assert len(block_ids) == -(-n_prompt // 16)
        assert params["remote_num_tokens"] == n_prompt
        assert params["transfer_mode"] == "pull"
        assert (await p.stats())["leases_active"] == 1

        status, out = await decode(session, d, params)
        assert status == 200
        # Like vLLM, the decode engine's usage counts only local prefix hits as cached;
        # the pulled tokens show in its external prefix-cache metrics.
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        async with session.get(f"{d.url}/metrics") as resp:
            metrics = await resp.text()
        assert (
            f'vllm:external_prefix_cache_hits_total{{engine="0",model_name="sim-model"}} {float(n_prompt)}'
            in metrics
        )
        assert 'source="external_kv_transfer"} ' + str(float(n_prompt)) in metrics
        assert out["usage"]["completion_tokens"] == 4

        # The same params a second time: the blocks were freed after the first pull.
        status, out = await decode(session, d, params)
        assert status == 500
        assert "failed to load KV" in out["error"]["message"]

    p_stats, d_stats = await p.stats(), await d.stats()
    assert p_stats["kv_pulls_served"] == 1
    assert p_stats["kv_pulls_rejected"] == 1
    assert p_stats["leases_active"] == 0
    assert d_stats["kv_pulls_ok"] == 1
    assert d_stats["kv_pulls_failed"] == 1
    assert d_stats["requests_by_role"]["decode"] == 2
    assert p_stats["requests_by_role"]["prefill"] == 1


async def test_pulled_prefix_is_cached_on_decode_afterwards(start_sim: Any) -> None:
    p = await start_sim(zero_latency=True)
    d = await start_sim(zero_latency=True)
    async with aiohttp.ClientSession() as session:
        params = (await prefill(session, p))["kv_transfer_params"]
        assert (await decode(session, d, params))[0] == 200
        async with session.post(
            f"{d.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}
        ) as resp:
            local = await resp.json()
    n_prompt = local["usage"]["prompt_tokens"]
    assert local["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt // 16 * 16


async def test_expired_lease_fails_the_pull(start_sim: Any) -> None:
    p = await start_sim(zero_latency=True, kv_lease_seconds=0.2)
    d = await start_sim(zero_latency=True)
    async with aiohttp.ClientSession() as session:
        params = (await prefill(session, p))["kv_transfer_params"]
        deadline = time.monotonic() + 10
        while (await p.stats())["leases_expired"] == 0:
            assert time.monotonic() < deadline, "lease never expired"
            await asyncio.sleep(0.05)
        status, _ = await decode(session, d, params)
    assert status == 500
    stats = await p.stats()
    assert stats["leases_active"] == 0
    assert stats["kv_pulls_served"] == 0


@pytest.mark.parametrize(
    "corrupt",
    [
        {"remote_block_ids": [9999, 9998]},
        {"remote_engine_id": "someone-else"},
    ],
    ids=["wrong-block-ids", "wrong-engine-id"],
)
@pytest.mark.parametrize("policy", ["fail", "recompute"])
async def test_bad_params_follow_the_load_failure_policy(
    start_sim: Any, corrupt: dict[str, Any], policy: str
) -> None:
    p = await start_sim(zero_latency=True)
    d = await start_sim(zero_latency=True, kv_load_failure_policy=policy)
    async with aiohttp.ClientSession() as session:
        params = (await prefill(session, p))["kv_transfer_params"]
        status, out = await decode(session, d, {**params, **corrupt})
        if policy == "fail":
            assert status == 500
            assert out["error"]["code"] == 500
        else:
            assert status == 200
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        # The rightful decode can still pull: a rejected pull does not free the lease.
        good_status, _ = await decode(session, d, params)
    d_stats, p_stats = await d.stats(), await p.stats()
    assert good_status == 200
    assert d_stats["kv_pulls_failed"] == 1
    assert d_stats["recomputes"] == (1 if policy == "recompute" else 0)
    assert p_stats["kv_pulls_rejected"] == 1
    assert p_stats["kv_pulls_served"] == 1


@pytest.mark.parametrize(
    ("fault", "policy"),
    [
        ({"kind": "status", "status": 500}, "fail"),
        ({"kind": "malformed_json"}, "fail"),
        ({"kind": "disconnect"}, "fail"),
        ({"kind": "status", "status": 503}, "recompute"),
    ],
    ids=["status-fail", "garbage-fail", "disconnect-fail", "status-recompute"],
)
async def test_fault_on_the_pull_follows_the_load_failure_policy(
    start_sim: Any, fault: dict[str, Any], policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    p = await start_sim(zero_latency=True, role="prefill")
    d = await start_sim(zero_latency=True, kv_load_failure_policy=policy)
    async with aiohttp.ClientSession() as session:
        params = (await prefill(session, p))["kv_transfer_params"]
        await p.add_fault(**fault, paths=[PULL_PATH], roles=["prefill"])
        status, out = await decode(session, d, params)
        assert status == (500 if policy == "fail" else 200)
        # One shot: the lease is still there, so the next pull succeeds.
        again, _ = await decode(session, d, params)
    assert again == 200
    d_stats, p_stats = await d.stats(), await p.stats()
    assert d_stats["kv_pulls_failed"] == 1
    assert d_stats["kv_pulls_ok"] == 1
    assert d_stats["recomputes"] == (1 if policy == "recompute" else 0)
    assert p_stats["kv_pulls_served"] == 1
    assert p_stats["leases_active"] == 0
    if policy == "fail":
        assert out["error"]["code"] == 500
    # An injected fault is not the engine failing: no traceback, no error line.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_fault_not_naming_the_pull_leaves_pulls_alone(start_sim: Any) -> None:
    p = await start_sim(zero_latency=True, role="prefill")
    d = await start_sim(zero_latency=True)
    async with aiohttp.ClientSession() as session:
        params = (await prefill(session, p))["kv_transfer_params"]
        await p.add_fault(kind="status", status=500, count=-1)
        status, _ = await decode(session, d, params)
    assert status == 200
    assert (await p.stats())["kv_pulls_served"] == 1


async def test_stream_decode_failure_is_an_error_event(start_sim: Any) -> None:
    d = await start_sim(zero_latency=True)
    p = await start_sim(zero_latency=True)
    async with aiohttp.ClientSession() as session:
        params = (await prefill(session, p))["kv_transfer_params"]
        body = {
            "messages": MESSAGES,
            "max_tokens": 4,
            "stream": True,
            "kv_transfer_params": {**params, "remote_engine_id": "nope"},
        }
        async with session.post(f"{d.url}/v1/chat/completions", json=body) as resp:
            text = await resp.text()
    assert '"error"' in text
    assert text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    ("max_tokens", "stop_by", "on_stop", "handed_over"),
    [
        # A one-token prefill leg: the core finished it at the cap before the front end
        # saw the stop string, so the KV is handed over (vLLM 0.32, tests/engine_facts.py).
        (1, "string", True, True),
        # Generation stopped by a stop string before the cap: the front end aborts it.
        (4, "string", True, False),
        # Stopped in the core (a stop token, EOS): 0.32 hands the KV over, older vLLM not.
        (1, "token", True, True),
        (1, "token", False, False),
    ],
)
async def test_params_when_prefill_stopped_early(
    start_sim: Any, max_tokens: int, stop_by: str, on_stop: bool, handed_over: bool
) -> None:
    p = await start_sim(zero_latency=True, kv_params_on_stop=on_stop)
    async with aiohttp.ClientSession() as session:
        first = await prefill(session, p, kv_transfer_params=None, max_tokens=1)
        first_word = first["choices"][0]["message"]["content"]
        first_id = output_token_ids(tokenize(chat_prompt(MESSAGES)), 1)[0]
        await p.reset()
        stop: dict[str, Any] = (
            {"stop": [first_word]} if stop_by == "string" else {"stop_token_ids": [first_id]}
        )
        early = await prefill(session, p, max_tokens=max_tokens, **stop)
    assert early["choices"][0]["finish_reason"] == "stop"
    if handed_over:
        assert early["kv_transfer_params"]["remote_request_id"]
        assert (await p.stats())["leases_active"] == 1
    else:
        assert early.get("kv_transfer_params") is None
        assert (await p.stats())["leases_active"] == 0


async def test_decode_params_missing_fields_warn_and_compute(
    start_sim: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # vLLM logs "Got invalid KVTransferParams" and computes the prompt: no 400.
    d = await start_sim(zero_latency=True)
    partial = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": [[1]],
               "remote_host": "127.0.0.1", "remote_port": 1}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        for params in ({"do_remote_prefill": True}, partial):
            status, out = await decode(session, d, params)
            assert status == 200, out
            assert out["choices"][0]["finish_reason"] == "length"
    stats = await d.stats()
    assert stats["kv_params_invalid"] == 2
    assert stats["kv_pulls_ok"] == stats["kv_pulls_failed"] == 0  # nothing was pulled
    assert "missing remote_request_id" in caplog.text  # protocol v2 needs it


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "alpha beta gamma " * 10, "max_tokens": 1}),
        ("/v1/responses", {"input": "alpha beta gamma " * 10, "max_output_tokens": 1}),
        (
            "/v1/messages",
            {"messages": [{"role": "user", "content": "alpha " * 30}], "max_tokens": 1},
        ),
        (
            "/inference/v1/generate",
            {"token_ids": list(range(300, 340)), "sampling_params": {"max_tokens": 1}},
        ),
    ],
)
async def test_handshake_on_every_shape(start_sim: Any, path: str, body: dict[str, Any]) -> None:
    p = await start_sim(zero_latency=True)
    d = await start_sim(zero_latency=True)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{p.url}{path}", json={**body, "kv_transfer_params": PREFILL_PARAMS}
        ) as resp:
            params = (await resp.json())["kv_transfer_params"]
        async with session.post(
            f"{d.url}{path}", json={**body, "kv_transfer_params": params}
        ) as resp:
            assert resp.status == 200
    assert (await d.stats())["kv_pulls_ok"] == 1
