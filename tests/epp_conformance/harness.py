"""Conformance scenarios on the local harness: EPPs running the test plugins over
file-discovered simulated engines, behind the real Envoy.

Two gateway shapes. The product's own config (``tests.epp_gateway.envoy_gateway``,
ORIGINAL_DST on the EPP's header), and a pool-aware one built here for what the product
config has no knob for: an InferencePool's ``failureMode``, and weighted routes or route
rules across several pools. In the pool-aware shape each pool is a STATIC cluster of its
endpoints (the gateway knows the pool's members, as a gateway resolving an InferencePool
does) whose ``override_host`` load balancing takes the EPP's pick from the ``envoy.lb``
metadata and falls back to round robin when there is none (the EPP was skipped); each
route (or weighted cluster) asks its own pool's EPP through a per-route ext_proc
override.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import yaml

from epp.app import EppApp
from epp.plugins.conformance import SELECTION_HEADER
from epp.settings import EppSettings
from tests.conftest import eventually, sample_sum
from tests.epp_gateway.envoy_gateway import gateway_config

__all__ = [
    "BODY",
    "Pod",
    "Pool",
    "pool_gateway_config",
    "post",
    "start_epp",
]

BODY = {"model": "sim-model", "prompt": "Write as if you were a critic: San Francisco"}
CHAT_BODY = {"model": "sim-model", "messages": [{"role": "user", "content": BODY["prompt"]}]}

_EXT_PROC_PER_ROUTE = (
    "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
)
_OVERRIDE_HOST = (
    "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost"
)
_ROUND_ROBIN = (
    "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"
)
_LB = "envoy.lb"


@dataclass(frozen=True)
class Pod:
    """One endpoint of a pool (a simulated engine, or one data-parallel rank of one)."""

    name: str
    host: str
    port: int

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"


def epp_config(endpoints_file: Path) -> str:
    """The conformance EPP: only the test header decides; any of its endpoints may win."""
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: file-discovery
  parameters: {{path: '{endpoints_file}', watchFile: true, watchIntervalSeconds: 0.02}}
- type: header-based-testing-filter
- type: destination-endpoint-served-verifier
- type: random-picker
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: header-based-testing-filter}}, {{pluginRef: random-picker}}]
"""


def write_endpoints(workdir: Path, pods: Sequence[Pod]) -> Path:
    """The file-discovery file listing ``pods``."""
    workdir.mkdir(parents=True, exist_ok=True)
    endpoints = workdir / "endpoints.yaml"
    entries = [
        {"name": p.name, "namespace": "default", "address": p.host, "port": str(p.port)}
        for p in pods
    ]
    endpoints.write_text(yaml.safe_dump({"endpoints": entries}))
    return endpoints


async def start_epp(workdir: Path, pods: Sequence[Pod], *, tls: bool = False) -> EppApp:
    """An EPP over ``pods``, serving once it knows all of them; the caller stops it."""
    endpoints = write_endpoints(workdir, pods)
    settings = EppSettings(
        grpc_port=0,
        grpc_health_port=0,
        metrics_port=0,
        bind_address="127.0.0.1",
        config_text=epp_config(endpoints),
        secure_serving=tls,
        shutdown_grace=1.0,
        tracing=False,
        metrics_endpoint_auth=False,
    )
    app = EppApp(settings)
    try:
        await app.start()

        async def all_known() -> bool:
            return app.director is not None and len(app.director.datastore) == len(pods)

        await eventually(all_known, "the EPP to discover every pod")
    except BaseException:
        await app.stop()
        raise
    return app


def decisions(app: EppApp) -> float:
    """Requests the EPP routed (its decode-only decisions)."""
    return sample_sum(
        app.metrics.registry, "llm_d_epp_disagg_decision_total", decision_type="decode-only"
    )


@dataclass(frozen=True)
class Pool:
    """An InferencePool as the gateway sees it: its EPP, its endpoints, and how the route
    reaches it: a weight in one route's split, or (``path``) a route rule of its own."""

    name: str
    epp_port: int
    endpoints: Sequence[str]
    weight: int = 1
    path: str | None = None


def _pool_cluster(pool: Pool) -> dict[str, Any]:
    hosts = []
    for endpoint in pool.endpoints:
        host, _, port = endpoint.rpartition(":")
        address = {"socket_address": {"address": host, "port_value": int(port)}}
        hosts.append({"endpoint": {"address": address}})
    return {
        "name": f"pool-{pool.name}",
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": f"pool-{pool.name}",
            "endpoints": [{"lb_endpoints": hosts}],
        },
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.override_host",
                        "typed_config": {
                            "@type": _OVERRIDE_HOST,
                            "override_host_sources": [
                                {
                                    "metadata": {
                                        "key": _LB,
                                        "path": [{"key": "x-gateway-destination-endpoint"}],
                                    }
                                }
                            ],
                            "fallback_policy": {
                                "policies": [
                                    {
                                        "typed_extension_config": {
                                            "name": "envoy.load_balancing_policies.round_robin",
                                            "typed_config": {"@type": _ROUND_ROBIN},
                                        }
                                    }
                                ]
                            },
                        },
                    }
                }
            ]
        },
    }


def pool_gateway_config(
    pools: Sequence[Pool],
    *,
    failure_mode: Literal["FailOpen", "FailClose"] = "FailClose",
    request_body_mode: str | None = None,
) -> dict[str, Any]:
    """One listener, one route splitting traffic across ``pools`` by weight; each pool's
    requests go to its own EPP (a per-route ext_proc override) and then to its own
    endpoints. ``failure_mode`` is the InferencePool's: with ``FailOpen`` a request whose
    EPP cannot be reached is still served, by the pool's fallback balancing.

    Request bodies go to the EPP FULL_DUPLEX_STREAMED, except with ``FailOpen``, where
    they are BUFFERED unless ``request_body_mode`` says otherwise: Envoy (1.40) fails a
    FULL_DUPLEX_STREAMED request that carries a body closed even with
    ``failure_mode_allow`` once the EPP is unreachable, since the body has already been
    handed to the broken stream; only bodyless requests fail open then.
    """
    if request_body_mode is None:
        request_body_mode = "BUFFERED" if failure_mode == "FailOpen" else "FULL_DUPLEX_STREAMED"
    config = gateway_config(
        pools[0].epp_port, report_served=True, request_body_mode=request_body_mode
    )
    resources = config["static_resources"]
    hcm = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [ext_proc] = [
        f["typed_config"] for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"
    ]
    ext_proc["failure_mode_allow"] = failure_mode == "FailOpen"
    # The EPP's envoy.lb metadata stays in that namespace, where override_host reads it.
    ext_proc["metadata_options"]["receiving_namespaces"] = {"untyped": [_LB]}
    ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"] = f"epp-{pools[0].name}"
    [epp_cluster] = [c for c in resources["clusters"] if c["name"] == "epp"]
    clusters = []
    for pool in pools:
        cluster = copy.deepcopy(epp_cluster)
        cluster["name"] = f"epp-{pool.name}"
        assignment = cluster["load_assignment"]
        assignment["cluster_name"] = cluster["name"]
        assignment["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
            "port_value"
        ] = pool.epp_port
        clusters += [cluster, _pool_cluster(pool)]
    resources["clusters"] = clusters
    virtual_host = hcm["route_config"]["virtual_hosts"][0]
    [route] = virtual_host["routes"]
    action = route["route"]
    del action["cluster"]
    if all(pool.path is not None for pool in pools):
        # One rule per pool, matched by path prefix; each rule asks its pool's EPP.
        rules = []
        for pool in pools:
            rule = copy.deepcopy(route)
            rule["match"] = {"prefix": pool.path}
            rule["route"]["cluster"] = f"pool-{pool.name}"
            rule["typed_per_filter_config"] = _ask_epp_of(pool)
            rules.append(rule)
        virtual_host["routes"] = rules
    elif len(pools) == 1:
        action["cluster"] = f"pool-{pools[0].name}"
    else:
        action["weighted_clusters"] = {
            "clusters": [
                {
                    "name": f"pool-{pool.name}",
                    "weight": pool.weight,
                    "typed_per_filter_config": _ask_epp_of(pool),
                }
                for pool in pools
            ]
        }
    return config


def _ask_epp_of(pool: Pool) -> dict[str, Any]:
    """Per-route ext_proc config: this route's requests go to ``pool``'s EPP."""
    return {
        "envoy.filters.http.ext_proc": {
            "@type": _EXT_PROC_PER_ROUTE,
            "overrides": {"grpc_service": {"envoy_grpc": {"cluster_name": f"epp-{pool.name}"}}},
        }
    }


async def post(
    session: aiohttp.ClientSession,
    url: str,
    selection: str | None = None,
    path: str = "/v1/completions",
) -> tuple[int, dict[str, str], bytes]:
    """One completion through the gateway, steered by the test header when given."""
    headers = {SELECTION_HEADER: selection} if selection is not None else {}
    body = CHAT_BODY if path.endswith("/chat/completions") else BODY
    async with session.post(f"{url}{path}", json=body, headers=headers) as resp:
        body = await resp.read()
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, body


async def gather_limited(n: int, concurrency: int, make: Any) -> list[Any]:
    """Run ``make()`` ``n`` times, at most ``concurrency`` at once."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> Any:
        async with gate:
            return await make()

    return await asyncio.gather(*(one() for _ in range(n)))
