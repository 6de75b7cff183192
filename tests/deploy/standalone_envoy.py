"""The Envoy configuration of examples/standalone, generated from ``epp.envoy_config``.

Envoy runs in the EPP's pod: it reaches the EPP on loopback (TLS, as the EPP serves by
default), listens for clients on all interfaces, and keeps its admin API on loopback.
Regenerate the committed file after changing the gateway shape::

    .venv/bin/python -m tests.deploy.standalone_envoy
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from epp.envoy_config import gateway_config

__all__ = [
    "ADMIN_PORT",
    "EPP_GRPC_PORT",
    "LISTEN_PORT",
    "STANDALONE_ENVOY_FILE",
    "render",
    "standalone_envoy_config",
]

EPP_GRPC_PORT = 9002
LISTEN_PORT = 8081
ADMIN_PORT = 19000
STANDALONE_ENVOY_FILE = Path(__file__).resolve().parents[2] / "examples/standalone/envoy.yaml"

_HEADER = """\
# Generated from epp/envoy_config.py (gateway_config) by
#   .venv/bin/python -m tests.deploy.standalone_envoy
# tests/deploy checks that this file matches the generator; do not edit by hand.
"""


def standalone_envoy_config() -> dict[str, Any]:
    return gateway_config(
        EPP_GRPC_PORT,
        epp_host="127.0.0.1",
        epp_tls=True,
        listen_host="0.0.0.0",
        listen_port=LISTEN_PORT,
        admin_port=ADMIN_PORT,
    )


def render() -> str:
    return _HEADER + yaml.safe_dump(standalone_envoy_config(), sort_keys=False)


if __name__ == "__main__":
    STANDALONE_ENVOY_FILE.write_text(render(), encoding="utf-8")
    print(f"wrote {STANDALONE_ENVOY_FILE}")
