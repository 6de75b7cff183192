"""Real Envoy -> the whole EPP (flow control configured) -> one held decode backend."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from epp.app import EppApp
from epp.requestmgmt.manager import RequestManager
from epp.settings import EppSettings
from tests.epp_gateway.backends import RecordingBackend
from tests.epp_gateway.envoy_gateway import EnvoyGateway, gateway_config
from tests.epp_gateway.pool import write_endpoints


def epp_config(endpoints: Path, *, gate: bool, extra: str = "") -> str:
    """Decode-only scheduling; a concurrency detector that calls one in-flight request
    per endpoint saturation."""
    gates = "featureGates: [flowControl]\n" if gate else ""
    return (
        "apiVersion: llm-d.ai/v1alpha1\n"
        "kind: EndpointPickerConfig\n"
        f"{gates}"
        "plugins:\n"
        "- type: file-discovery\n"
        f"  parameters: {{path: '{endpoints}', watchFile: true, watchIntervalSeconds: 0.02}}\n"
        "- type: decode-filter\n"
        "- type: max-score-picker\n"
        "- type: concurrency-detector\n"
        "  parameters: {maxConcurrency: 1}\n"
        "schedulingProfiles:\n"
        "- name: default\n"
        "  plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker}]\n"
        f"{extra}"
    )


@dataclass
class Stack:
    app: EppApp
    envoy: EnvoyGateway
    backend: RecordingBackend

    @property
    def requests(self) -> RequestManager:
        assert self.app.director is not None
        return self.app.director.requests

    def metric(self, name: str, **labels: str) -> float:
        from tests.conftest import sample_sum

        return sample_sum(self.app.metrics.registry, name, **labels)


@contextlib.asynccontextmanager
async def stack(
    tmp_path: Path,
    *,
    gate: bool,
    extra: str = "",
    objects: str | None = None,
    decision_timeout: float = 10.0,
) -> AsyncIterator[Stack]:
    backend = RecordingBackend("d", hold=True)
    await backend.start()
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [(backend, "decode")])
    objects_file = None
    if objects is not None:
        objects_file = tmp_path / "objects.yaml"
        objects_file.write_text(objects)
    settings = EppSettings(
        grpc_port=0,
        grpc_health_port=0,
        metrics_port=0,
        bind_address="127.0.0.1",
        config_text=epp_config(endpoints, gate=gate, extra=extra),
        shutdown_grace=1.0,
        metrics_endpoint_auth=False,
        tracing=False,
        secure_serving=False,
        api_objects_file=str(objects_file) if objects_file else None,
        decision_timeout=decision_timeout,
    )
    app = EppApp(settings)
    envoy: EnvoyGateway | None = None
    try:
        await app.start()
        envoy = EnvoyGateway(gateway_config(app.grpc_port, epp_tls=False), tmp_path / "envoy")
        await envoy.start()
        yield Stack(app, envoy, backend)
    finally:
        backend.release.set()
        if envoy is not None:
            await envoy.stop()
        await app.stop()
        await backend.stop()
