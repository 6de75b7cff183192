"""Concurrent connectors (sglang, mooncake) against simulated engines: a failed prefill is
retried on the next prefiller with fresh pairing while the client has seen nothing, and
Mooncake pins a data-parallel prefill rank whose engine id the decode gets."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.sidecar.conftest import RunningSidecar, StartSidecar

PROMPT = "tell me about kv caches " * 8
BODY = {"model": "sim-model", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}


async def two_prefillers(
    connector: str, start_sim: Any, start_sidecar: StartSidecar
) -> tuple[Any, Any, Any, RunningSidecar]:
    """Two prefillers on two loopback addresses with one bootstrap port number (the
    sidecar reaches every prefiller's bootstrap server on the same port), one decode."""
    mode = "prefill" if connector == "sglang" else "null"
    first = await start_sim(zero_latency=True, disaggregation_mode=mode, bootstrap_port=0,
                            bootstrap_timeout_seconds=5)  # fmt: skip
    port = first.bootstrap_port
    second = await start_sim(zero_latency=True, disaggregation_mode=mode, bootstrap_port=port,
                             host="127.0.0.2", bootstrap_timeout_seconds=5)  # fmt: skip
    d = await start_sim(zero_latency=True, bootstrap_timeout_seconds=5,
                        disaggregation_mode="decode" if connector == "sglang" else "null")  # fmt: skip
    flag = {"sglang": "sglang_bootstrap_port", "mooncake": "mooncake_bootstrap_port"}[connector]
    sidecar = await start_sidecar(
        model_server_port=d.port, kv_connector=connector, prefill_max_retries=1, **{flag: port}
    )
    return first, second, d, sidecar


def pairing(connector: str, body: dict[str, Any]) -> object:
    if connector == "sglang":
        return body["bootstrap_room"]
    return body["kv_transfer_params"]["transfer_id"]


@pytest.mark.parametrize("connector", ["sglang", "mooncake"])
async def test_failed_prefill_is_retried_on_the_next_prefiller_with_new_pairing(
    connector: str, start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    first, second, d, sidecar = await two_prefillers(connector, start_sim, start_sidecar)
    await first.add_fault(kind="status", status=503)
    headers = {"x-prefiller-host-port": f"{first.host_port},{second.host_port}"}
    async with client.post(sidecar.url + "/v1/chat/completions", json=BODY, headers=headers) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert answer["choices"][0]["finish_reason"] == "length"
    (failed,) = (await first.stats())["recorded"]
    (served,) = (await second.stats())["recorded"]
    decodes = [rec["body"] for rec in (await d.stats())["recorded"]]
    # The decode was restarted with the second attempt's pairing, never reusing the first.
    assert pairing(connector, failed["body"]) != pairing(connector, served["body"])
    assert [pairing(connector, b) for b in decodes] == [
        pairing(connector, failed["body"]),
        pairing(connector, served["body"]),
    ]
    assert failed["headers"]["x-request-id"] == served["headers"]["x-request-id"]
    assert (await d.stats())["kv_pulls_ok"] == 1
    assert sidecar.sample("pd_sidecar_prefill_retries_total", reason="status_503") == 1


@pytest.mark.parametrize("connector", ["sglang", "mooncake"])
async def test_no_retry_left_is_a_clean_502(
    connector: str, start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    first, second, _, sidecar = await two_prefillers(connector, start_sim, start_sidecar)
    for sim in (first, second):
        await sim.add_fault(kind="status", status=503)
    headers = {"x-prefiller-host-port": f"{first.host_port},{second.host_port}"}
    async with client.post(sidecar.url + "/v1/chat/completions", json=BODY, headers=headers) as r:
        assert r.status == 502
        assert (await r.json())["error"]["stage"] == "prefill"
    assert sidecar.sample("pd_sidecar_prefill_failures_total", reason="status_503") == 1


async def test_mooncake_pins_a_data_parallel_rank_and_names_its_engine(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    # The prefill pod runs 4 ranks; /query lists 4 engine ids. A prefill not pinned to
    # the rank whose id the decode was given publishes where the decode never looks.
    p = await start_sim(zero_latency=True, bootstrap_port=0, data_parallel_size=4,
                        bootstrap_timeout_seconds=5)  # fmt: skip
    d = await start_sim(zero_latency=True, bootstrap_timeout_seconds=5)
    sidecar = await start_sidecar(
        model_server_port=d.port, kv_connector="mooncake", mooncake_bootstrap_port=p.bootstrap_port
    )
    headers = {"x-prefiller-host-port": p.host_port}
    for i in range(16):
        body = {**BODY, "messages": [{"role": "user", "content": f"{i} {PROMPT}"}]}
        async with client.post(
            sidecar.url + "/v1/chat/completions", json=body, headers=headers
        ) as r:
            assert r.status == 200, await r.text()
    p_stats, d_stats = await p.stats(), await d.stats()
    assert d_stats["kv_pulls_ok"] == 16 and d_stats["kv_pulls_failed"] == 0
    assert len(p_stats["requests_by_dp_rank"]) > 1  # spread over the ranks
    engine_ids = {str(r): p.engine.config.rank_engine_id(r) for r in range(4)}
    for p_rec, d_rec in zip(p_stats["recorded"], d_stats["recorded"], strict=True):
        rank = p_rec["headers"]["x-data-parallel-rank"]
        assert d_rec["body"]["kv_transfer_params"]["remote_engine_id"] == engine_ids[rank]


async def test_mooncake_prefill_that_finished_its_generation_is_decoded_locally(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    # Mooncake publishes KV only for a prefill stopped at the cap: a first-token stop
    # leaves the waiting decode nothing; the client gets the client-body decode instead.
    from vllm_sim.tokens import chat_prompt, output_token_ids, tokenize

    p = await start_sim(zero_latency=True, bootstrap_port=0, bootstrap_timeout_seconds=30)
    d = await start_sim(zero_latency=True, bootstrap_timeout_seconds=30)
    sidecar = await start_sidecar(
        model_server_port=d.port, kv_connector="mooncake", mooncake_bootstrap_port=p.bootstrap_port
    )
    stop_id = output_token_ids(tokenize(chat_prompt(BODY["messages"])), 1)[0]
    body = {**BODY, "stop_token_ids": [stop_id]}
    headers = {"x-prefiller-host-port": p.host_port}
    async with client.post(sidecar.url + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["choices"][0]["finish_reason"] == "stop"
    decodes = [rec["body"] for rec in (await d.stats())["recorded"]]
    assert len(decodes) == 2
    assert "kv_transfer_params" in decodes[0]  # the paired decode, stopped
    assert decodes[1] == body  # the client's own body
    assert sidecar.sample("pd_sidecar_prefill_finished_total") == 1
