"""offloading: vLLM's OffloadingConnector P2P tier, both legs at once (simulated engines).

The sidecar's ``--p2p-connector-port`` is where every engine's tier listens; the
simulator serves its tier on its side channel, so each test points the flag at the
prefill engine's side-channel port.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from sidecar.api_shapes import shape_for
from sidecar.connectors import ConnectorOptions, LegContext, create_connector
from sidecar.p2p import P2PTier
from sidecar.routing import HostPort
from tests.conftest import eventually
from tests.sidecar.conftest import StartSidecar
from tests.sidecar_connectors.conftest import sse_events

PROMPT = "offloaded blocks travel between peers " * 8


async def offloading_pd(start_sim: Any, start_sidecar: StartSidecar, **sidecar: Any) -> Any:
    p = await start_sim(zero_latency=True, bootstrap_timeout_seconds=5.0)
    d = await start_sim(zero_latency=True, bootstrap_timeout_seconds=5.0)
    sc = await start_sidecar(
        model_server_port=d.port,
        kv_connector="offloading",
        p2p_connector_port=p.engine.side_channel_port,
        **sidecar,
    )
    return p, d, sc


async def test_offloading_flow_with_the_openai_client(
    start_sim: Any, start_sidecar: StartSidecar
) -> None:
    p, d, sidecar = await offloading_pd(start_sim, start_sidecar)
    headers = {"x-prefiller-host-port": p.host_port}
    messages: Any = [{"role": "user", "content": PROMPT}]
    async with openai.AsyncOpenAI(
        base_url=f"{sidecar.url}/v1", api_key="unused", max_retries=0, default_headers=headers
    ) as client:
        reply = await client.chat.completions.create(
            model="sim-model", messages=messages, max_tokens=6, max_completion_tokens=5
        )
        stream = await client.chat.completions.create(
            model="sim-model", messages=messages, max_tokens=6, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
    assert reply.choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6

    p_stats, d_stats = await p.stats(), await d.stats()
    # Each decode took the KV its prefill stored, from the prefill engine's tier.
    assert p_stats["kv_pulls_served"] == 2
    assert (d_stats["kv_pulls_ok"], d_stats["kv_pulls_failed"]) == (2, 0)
    assert p_stats["requests_by_role"]["prefill"] == 2
    assert d_stats["requests_by_role"]["decode"] == 2
    ids = set()
    for p_rec, d_rec in zip(p_stats["recorded"], d_stats["recorded"], strict=True):
        p_body, d_body = p_rec["body"], d_rec["body"]
        kv_request_id = p_body["kv_transfer_params"]["remote_decoder"]["kv_request_id"]
        # The prefill stores under the id, with no peer address.
        assert p_body["kv_transfer_params"] == {"remote_decoder": {"kv_request_id": kv_request_id}}
        assert d_body["kv_transfer_params"] == {
            "remote_prefiller": {
                "kv_request_id": kv_request_id,
                "remote_host": "127.0.0.1",
                "remote_port": p.engine.side_channel_port,
            }
        }
        ids.add(kv_request_id)
        assert p_body["stream"] is False and "stream_options" not in p_body
        assert p_body["max_tokens"] == 1
        assert p_rec["headers"]["x-request-id"] == d_rec["headers"]["x-request-id"]
    # The decode leg keeps the client's limits; the prefill's optional cap too.
    first_p, first_d = p_stats["recorded"][0]["body"], d_stats["recorded"][0]["body"]
    assert first_p["max_completion_tokens"] == 1
    assert (first_d["max_tokens"], first_d["max_completion_tokens"]) == (6, 5)
    assert "max_completion_tokens" not in p_stats["recorded"][1]["body"]
    assert d_stats["recorded"][1]["body"]["stream"] is True
    assert len(ids) == 2  # a fresh id per request


@pytest.mark.parametrize("stream", [False, True])
async def test_failed_prefill_ends_the_concurrent_decode(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, stream: bool
) -> None:
    p, d, sidecar = await offloading_pd(start_sim, start_sidecar, prefill_max_retries=0)
    await p.add_fault(kind="status", status=500)
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 4, "stream": stream}
    headers = {"x-prefiller-host-port": p.host_port}
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 502
        error = (await r.json())["error"]
    assert error["stage"] == "prefill" and "500" in error["message"]

    # The decode leg was sent alongside the prefill (it is waiting on the tier), and is
    # ended when the prefill fails, well before the tier's 5 s wait.
    async def decode_aborted() -> bool:
        stats = await d.stats()
        return stats["requests_by_role"]["decode"] == 1 and stats["aborts"] == 1

    await eventually(decode_aborted, timeout=2.5, what="the decode leg aborted")
    assert (await d.stats())["kv_pulls_ok"] == 0
    assert sidecar.sample("pd_sidecar_prefill_failures_total", reason="status_500") == 1


async def test_streamed_offloading_flow_raw_sse(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    p, d, sidecar = await offloading_pd(start_sim, start_sidecar)
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 3, "stream": True}
    headers = {"x-prefiller-host-port": p.host_port}
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200
        assert r.content_type == "text/event-stream"
        events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    assert (await p.stats())["kv_pulls_served"] == 1
    assert (await d.stats())["kv_pulls_ok"] == 1


@pytest.mark.parametrize(
    ("dp_size", "base_port", "target_port", "want"),
    [
        (1, 8000, 8003, 7777),  # one rank: the base port whatever the target
        (4, 8000, 8000, 7777),  # rank 0
        (4, 8000, 8002, 7779),  # rank 2
        (4, 8000, 8003, 7780),  # the last rank
        (4, 8000, 7999, 7777),  # below the rank range: rank 0's tier
        (4, 8000, 8004, 7777),  # beyond the rank range
        (4, 0, 8002, 7777),  # --port 0: no rank derivation
    ],
)
def test_tier_port_follows_the_targets_data_parallel_rank(
    dp_size: int, base_port: int, target_port: int, want: int
) -> None:
    tier = P2PTier(port=7777, data_parallel_size=dp_size, base_port=base_port)
    assert tier.port_for(HostPort("10.0.0.5", target_port)) == want


def _leg(prefiller: HostPort, kv_source: HostPort | None = None) -> LegContext:
    shape = shape_for("/v1/completions")
    assert shape is not None
    body = {"model": "m", "prompt": "x", "max_tokens": 9, "stream": True, "min_tokens": 2}
    return LegContext(shape, body, "req-1", prefiller, kv_source=kv_source)


def test_decode_leg_names_the_prefillers_rank_tier() -> None:
    options = ConnectorOptions(p2p=P2PTier(port=7777, data_parallel_size=4, base_port=8000))
    connector = create_connector("offloading", options)
    leg = _leg(HostPort("10.0.6.107", 8002))
    prefill, decode = connector.prefill_body(leg), connector.decode_body(leg, None)
    kv_request_id = prefill["kv_transfer_params"]["remote_decoder"]["kv_request_id"]
    assert decode["kv_transfer_params"]["remote_prefiller"] == {
        "kv_request_id": kv_request_id,
        "remote_host": "10.0.6.107",
        "remote_port": 7779,
    }
    assert (prefill["max_tokens"], prefill["stream"]) == (1, False)
    assert "min_tokens" not in prefill
    assert (decode["max_tokens"], decode["stream"], decode["min_tokens"]) == (9, True, 2)


def test_prefill_leg_pulls_from_another_rank_of_the_same_pod() -> None:
    options = ConnectorOptions(p2p=P2PTier(port=7777, data_parallel_size=4, base_port=8000))
    connector = create_connector("offloading", options)
    prefiller = HostPort("10.0.6.107", 8000)
    other_rank = connector.prefill_body(_leg(prefiller, HostPort("10.0.6.107", 8003)))
    source = other_rank["kv_transfer_params"]["remote_kv_source"]
    assert (source["remote_host"], source["remote_port"]) == ("10.0.6.107", 7780)
    own_id = other_rank["kv_transfer_params"]["remote_decoder"]["kv_request_id"]
    assert source["kv_request_id"] and source["kv_request_id"] != own_id
    # The prefiller itself (however spelled) is no source: nothing to pull from oneself.
    for same in (HostPort("10.0.6.107", 8000), HostPort("10.0.6.107", 8000)):
        body = connector.prefill_body(_leg(prefiller, same))
        assert "remote_kv_source" not in body["kv_transfer_params"]
    v6 = connector.prefill_body(_leg(HostPort("fd00::1", 8000), HostPort("fd00:0::1", 8000)))
    assert "remote_kv_source" not in v6["kv_transfer_params"]


class HeldPrefill:
    """A prefill engine stand-in whose answer waits for ``release``; it notes whether its
    request was abandoned (the sidecar closed the connection) or answered."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.received = asyncio.Event()
        self.outcome = ""
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.received.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.outcome = "abandoned"
            raise
        self.outcome = "answered"
        return web.json_response(
            {"id": "cmpl-1", "object": "text_completion", "model": "sim-model",
             "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
             "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9}}
        )  # fmt: skip

    async def start(self) -> HeldPrefill:
        app = web.Application()
        app.router.add_post("/v1/completions", self._handle)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = int(self.runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


async def test_a_prefill_still_running_when_the_decode_answered_is_not_aborted(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    prefill = await HeldPrefill().start()
    try:
        # The decode engine cannot reach any tier (port 1): it computes the prompt itself
        # and answers while the prefill is still held.
        d = await start_sim(zero_latency=True, kv_load_failure_policy="recompute")
        sidecar = await start_sidecar(
            model_server_port=d.port, kv_connector="offloading", p2p_connector_port=1
        )
        body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 2}
        headers = {"x-prefiller-host-port": f"127.0.0.1:{prefill.port}"}
        async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["finish_reason"] == "length"
        assert prefill.received.is_set() and prefill.outcome == ""
        prefill.release.set()

        async def answered() -> bool:
            return prefill.outcome != ""

        await eventually(answered, what="the held prefill to finish")
        assert prefill.outcome == "answered"
    finally:
        await prefill.stop()
