"""The Envoy configuration of the gateway pattern the EPP serves.

An HTTP listener whose ``ext_proc`` filter streams every request to the EPP
(FULL_DUPLEX_STREAMED bodies, over HTTP/2), then the router to an ``ORIGINAL_DST``
cluster that connects wherever the EPP's ``x-gateway-destination-endpoint`` header says.
Used by the local stack, the standalone deployment example and the tests.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SUBSET_HINT_NAMESPACE", "gateway_config"]

SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"

_HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def gateway_config(
    epp_port: int,
    *,
    epp_host: str = "127.0.0.1",
    epp_tls: bool = False,
    listen_host: str = "127.0.0.1",
    listen_port: int = 0,
    admin_port: int = 0,
    request_body_mode: str = "FULL_DUPLEX_STREAMED",
    forward_subset_hint: bool = False,
) -> dict[str, Any]:
    """A complete bootstrap config (JSON-serialisable) for one gateway Envoy.

    ``forward_subset_hint`` passes the ``envoy.lb.subset_hint`` metadata that a filter
    ahead of ext_proc sets on to the EPP.
    """
    epp_cluster: dict[str, Any] = {
        "name": "epp",
        "type": "STRICT_DNS" if not epp_host[:1].isdigit() else "STATIC",
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "epp",
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(epp_host, epp_port)}}]}
            ],
        },
    }
    if epp_tls:
        # The EPP serves a self-signed certificate unless given one, as in llm-d.
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
    if forward_subset_hint:
        ext_proc["metadata_options"] = {
            "forwarding_namespaces": {"untyped": [SUBSET_HINT_NAMESPACE]}
        }
    hcm = {
        "@type": _HCM,
        "stat_prefix": "gateway",
        # LLM streams are long: no idle or route timeouts at the gateway.
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
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }
    listener = {
        "name": "gateway",
        "address": _address(listen_host, listen_port),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }
    pods = {
        "name": "pods",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        "original_dst_lb_config": {
            "use_http_header": True,
            "http_header_name": "x-gateway-destination-endpoint",
        },
    }
    return {
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "static_resources": {"listeners": [listener], "clusters": [epp_cluster, pods]},
    }
