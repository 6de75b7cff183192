"""The failure policy, each rule by assertion against simulated engines."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import aiohttp
import pytest

from tests.sidecar.conftest import PD, StartSidecar

BODY = {"model": "sim-model", "prompt": "hello world " * 20, "max_tokens": 5}
STREAM_BODY = {**BODY, "max_tokens": 12, "stream": True}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def post(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str], body: Any = BODY
) -> tuple[int, dict[str, str], Any]:
    async with client.post(url + "/v1/completions", json=body, headers=headers) as resp:
        raw = await resp.read()
        try:
            payload: Any = json.loads(raw)
        except ValueError:
            payload = raw
        return resp.status, dict(resp.headers), payload


async def test_missing_kv_transfer_params_is_an_error_by_default(
    pd: PD, client: aiohttp.ClientSession
) -> None:
    await pd.prefill.add_fault(kind="omit_kv_transfer_params")
    status, headers, payload = await post(client, pd.url, pd.headers)
    assert status == 502
    assert payload["error"]["stage"] == "prefill"
    assert "kv_transfer_params" in payload["error"]["message"]
    assert payload["error"]["request_id"] == headers["X-Request-ID"]
    assert (await pd.decode.stats())["requests_total"] == 0  # no silent recompute
    assert (
        pd.sidecar.sample("pd_sidecar_prefill_failures_total", reason="missing_kv_transfer_params")
        == 1
    )
    assert (
        pd.sidecar.sample(
            "pd_sidecar_requests_total", path="/v1/completions", mode="pd", status="502"
        )
        == 1
    )


async def test_fallback_local_is_explicit_and_counted(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port, prefill_fallback="local")
    await prefill.add_fault(kind="omit_kv_transfer_params")
    headers = {"x-prefiller-host-port": prefill.host_port}
    status, resp_headers, _ = await post(client, sidecar.url, headers)
    assert status == 200
    assert resp_headers["x-pd-prefill-fallback"] == "missing_kv_transfer_params"
    d_stats = await decode.stats()
    assert d_stats["requests_by_role"]["aggregated"] == 1
    assert d_stats["recorded"][0]["body"] == BODY  # the client's body, untouched
    assert (
        sidecar.sample("pd_sidecar_prefill_fallbacks_total", reason="missing_kv_transfer_params")
        == 1
    )
    assert (
        sidecar.sample(
            "pd_sidecar_requests_total", path="/v1/completions", mode="fallback", status="200"
        )
        == 1
    )
    # Unreachable prefiller after retries: same policy, its own reason.
    status, resp_headers, _ = await post(
        client, sidecar.url, {"x-prefiller-host-port": f"127.0.0.1:{closed_port()}"}
    )
    assert status == 200
    assert resp_headers["x-pd-prefill-fallback"] == "connect"
    assert sidecar.sample("pd_sidecar_prefill_fallbacks_total", reason="connect") == 1


async def test_prefill_4xx_is_relayed_and_not_retried(
    pd: PD, client: aiohttp.ClientSession
) -> None:
    await pd.prefill.add_fault(kind="status", status=400)
    status, _, payload = await post(client, pd.url, pd.headers)
    assert status == 400
    assert "error" in payload and payload["error"].get("stage") is None  # the prefill's own
    assert (await pd.prefill.stats())["requests_total"] == 1
    assert (await pd.decode.stats())["requests_total"] == 0


async def test_retry_moves_to_the_next_prefiller(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    bad = await start_sim(role="prefill", zero_latency=True)
    good = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port, prefill_max_retries=2)
    await bad.add_fault(kind="status", status=503, count=-1)
    header = f"{bad.host_port}, 127.0.0.1:{closed_port()}, {good.host_port}"
    status, _, _ = await post(client, sidecar.url, {"x-prefiller-host-port": header})
    assert status == 200
    assert (await bad.stats())["requests_total"] == 1
    assert (await good.stats())["requests_by_role"]["prefill"] == 1
    assert (await decode.stats())["kv_pulls_ok"] == 1
    assert sidecar.sample("pd_sidecar_prefill_retries_total", reason="status_503") == 1
    assert sidecar.sample("pd_sidecar_prefill_retries_total", reason="connect") == 1


async def test_retries_exhausted_give_502(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port, prefill_max_retries=2)
    await prefill.add_fault(kind="status", status=503, count=-1)
    status, _, payload = await post(
        client, sidecar.url, {"x-prefiller-host-port": prefill.host_port}
    )
    assert status == 502
    assert payload["error"]["stage"] == "prefill"
    assert (await prefill.stats())["requests_total"] == 3
    assert (await decode.stats())["requests_total"] == 0


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"kind": "status", "status": 500}, "status_500"),
        ({"kind": "malformed_json"}, "malformed_answer"),
    ],
)
async def test_prefill_500_or_garbage_is_502_without_retry(
    pd: PD, client: aiohttp.ClientSession, fault: dict[str, Any], reason: str
) -> None:
    await pd.prefill.add_fault(**fault)
    status, _, payload = await post(client, pd.url, pd.headers)
    assert status == 502
    assert payload["error"]["stage"] == "prefill"
    assert pd.sidecar.sample("pd_sidecar_prefill_failures_total", reason=reason) == 1
    assert (await pd.prefill.stats())["requests_total"] == 1


async def test_no_retry_after_the_first_byte(pd: PD, client: aiohttp.ClientSession) -> None:
    await pd.decode.add_fault(kind="disconnect", after_chunks=3)
    async with client.post(pd.url + "/v1/completions", json=STREAM_BODY, headers=pd.headers) as r:
        assert r.status == 200
        text = (await r.read()).decode()
    events = [e for e in text.split("\n\n") if e.strip()]
    assert events[-1].startswith("event: error\ndata: ")
    error = json.loads(events[-1].split("data: ", 1)[1])["error"]
    assert error["stage"] == "decode"
    assert sum(1 for e in events if '"choices"' in e) == 3
    assert (await pd.decode.stats())["requests_total"] == 1
    assert (await pd.prefill.stats())["requests_total"] == 1


async def test_decode_unreachable_is_503(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=closed_port())
    status, _, payload = await post(
        client, sidecar.url, {"x-prefiller-host-port": prefill.host_port}
    )
    assert status == 503
    assert payload["error"]["message"] == "decode server not ready"
    async with client.get(sidecar.url + "/v1/models") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["message"] == "decode server not ready"


async def test_decode_error_answer_is_relayed(pd: PD, client: aiohttp.ClientSession) -> None:
    await pd.decode.add_fault(kind="status", status=500)
    status, _, payload = await post(client, pd.url, pd.headers)
    assert status == 500
    assert "error" in payload


async def test_decode_dropped_before_answering_is_resent_once_then_502(
    pd: PD, client: aiohttp.ClientSession
) -> None:
    # A connection closed before any response byte looks exactly like a stale pooled
    # connection: it is resent once, transparently.
    await pd.decode.add_fault(kind="disconnect")
    status, _, _ = await post(client, pd.url, pd.headers)
    assert status == 200
    assert pd.sidecar.sample("pd_sidecar_stale_connection_retries_total", stage="decode") == 1
    # Twice in a row is a real failure.
    await pd.decode.add_fault(kind="disconnect", count=2)
    status, _, payload = await post(client, pd.url, pd.headers)
    assert status == 502
    assert payload["error"]["stage"] == "decode"
    assert (await pd.decode.stats())["requests_total"] == 4


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"s"', b"{"])
async def test_pd_path_with_non_json_body_is_400(
    pd: PD, client: aiohttp.ClientSession, raw: bytes
) -> None:
    async with client.post(pd.url + "/v1/completions", data=raw, headers=pd.headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["stage"] == "request"
    assert (await pd.prefill.stats())["requests_total"] == 0


async def test_body_over_limit_is_413(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port, max_body_bytes=4096)
    headers = {"x-prefiller-host-port": prefill.host_port}
    big = {**BODY, "prompt": "x" * 5000}
    status, _, payload = await post(client, sidecar.url, headers, big)
    assert status == 413
    assert payload["error"]["code"] == 413

    async def chunked() -> Any:  # no Content-Length: the limit still holds
        for _ in range(10):
            yield b" " * 1000

    async with client.post(
        sidecar.url + "/v1/completions", data=chunked(), headers=headers
    ) as resp:
        assert resp.status == 413
    assert (await prefill.stats())["requests_total"] == 0


@pytest.mark.parametrize("value", ["", "nohostport", "[::1]", "10.0.0.1:99999", "a:1,b"])
async def test_unparsable_prefill_header_is_400(
    pd: PD, client: aiohttp.ClientSession, value: str
) -> None:
    status, _, payload = await post(client, pd.url, {"x-prefiller-host-port": value})
    assert status == 400
    assert "x-prefiller-host-port" in payload["error"]["message"]
    assert (await pd.decode.stats())["requests_total"] == 0


async def test_openai_client_sees_a_mid_stream_failure(pd: PD) -> None:
    import openai

    await pd.decode.add_fault(kind="disconnect", after_chunks=3)
    async with openai.AsyncOpenAI(
        base_url=pd.url + "/v1", api_key="unused", default_headers=pd.headers, max_retries=0
    ) as oai:
        stream = await oai.completions.create(
            model="sim-model", prompt="hello " * 20, max_tokens=20, stream=True
        )
        received = []
        with pytest.raises(openai.APIError, match="upstream stream broken"):
            async for chunk in stream:
                received.append(chunk)
    assert len(received) == 3


async def test_prefiller_sampling_spreads_load(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    first = await start_sim(role="prefill", zero_latency=True)
    second = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    header = {"x-prefiller-host-port": f"{first.host_port},{second.host_port}"}
    pinned = await start_sidecar(model_server_port=decode.port)
    for _ in range(5):
        assert (await post(client, pinned.url, header))[0] == 200
    assert (await second.stats())["requests_total"] == 0  # no sampling: the first entry
    sampled = await start_sidecar(model_server_port=decode.port, enable_prefiller_sampling=True)
    for _ in range(40):
        assert (await post(client, sampled.url, header))[0] == 200
    assert (await second.stats())["requests_total"] > 0
    assert (await first.stats())["requests_total"] > 5


async def test_passthrough_answer_cut_mid_body_drops_the_client_quietly(
    pd: PD, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # No prefill header: the engine's JSON answer is streamed through as it arrives,
    # so a cut can only be passed on as a dropped connection, never as a whole body.
    await pd.decode.add_fault(kind="truncate")
    caplog.set_level(logging.WARNING)
    async with client.post(pd.url + "/v1/completions", json=BODY) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert (
        pd.sidecar.sample(
            "pd_sidecar_requests_total", path="/v1/completions", mode="local", status="502"
        )
        == 1
    )
    ours = [r for r in caplog.records if r.name.startswith("pd_sidecar")]  # not the sim's
    assert not [r.getMessage() for r in ours if r.levelno >= logging.ERROR]
    [cut] = [r.msg for r in ours if isinstance(r.msg, dict) and r.msg["event"] == "response_cut"]
    assert cut["request_id"]
    # The sidecar is fine: the next request is answered.
    async with client.post(pd.url + "/v1/completions", json=BODY) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("mode", ["pd", "local"])
async def test_stream_cut_inside_an_event_relays_only_whole_events(
    pd: PD, client: aiohttp.ClientSession, mode: str
) -> None:
    # The engine dies halfway through its third event. Relayed, that half would be
    # ended by the blank line before the error event and reach the client as an event.
    await pd.decode.add_fault(kind="truncate", after_chunks=2)
    headers = pd.headers if mode == "pd" else {}
    status, _, payload = await post(client, pd.url, headers, STREAM_BODY)
    assert status == 200
    events = [e for e in payload.decode().split("\n\n") if e.strip()]
    *data, last = events
    assert len(data) == 2
    for event in data:
        assert event.startswith("data: ")
        json.loads(event[len("data: ") :])
    assert last.startswith("event: error\ndata: ")
    assert json.loads(last.split("data: ", 1)[1])["error"]["stage"] == "decode"
