"""The Envoy configuration of the gateway pattern the EPP serves.

An HTTP listener whose ``ext_proc`` filter streams every request to the EPP
(FULL_DUPLEX_STREAMED bodies, over HTTP/2), then the router to an ``ORIGINAL_DST``
cluster that connects wherever the EPP's ``x-gateway-destination-endpoint`` header says.
Used by the local stack, the standalone deployment example and the tests.

When the EPP cannot be reached, fails its stream or does not answer within the message
timeout, the request is refused (fail closed: an unrouted request has nowhere sensible to
go) with a 503 and an OpenAI-shaped JSON error body of type
``endpoint_picker_unavailable``; clients may retry. Envoy's other local replies (e.g. the
picked pod refused the connection) get the same JSON shape. The EPP's own refusals keep
the body the EPP wrote (they carry ``x-llm-d-request-dropped-reason``).
"""

from __future__ import annotations

from typing import Any

from common.routing_headers import DESTINATION_ENDPOINT

__all__ = [
    "EPP_UNAVAILABLE_STATUS",
    "POD_IDLE_TIMEOUT_S",
    "SUBSET_HINT_NAMESPACE",
    "gateway_config",
]

SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"

_HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_CEL_FILTER = "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"
# Set on every refusal the EPP itself sends (epp.extproc.headers.DROPPED_REASON).
_DROPPED_REASON = "x-llm-d-request-dropped-reason"
EPP_UNAVAILABLE_STATUS = 503
POD_IDLE_TIMEOUT_S = 60


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _when(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {"@type": _CEL_FILTER, "expression": expression},
        }
    }


def _error_body(message: str, error_type: str) -> dict[str, Any]:
    return {
        "json_format": {
            "error": {
                "message": message,
                "type": error_type,
                "param": None,
                "code": "%RESPONSE_CODE%",
            }
        },
        "content_type": "application/json",
    }


def _local_reply_config() -> dict[str, Any]:
    """JSON error bodies for Envoy's own local replies; the EPP's refusals pass as sent."""
    not_from_epp = f"!('{_DROPPED_REASON}' in response.headers)"
    return {
        "mappers": [
            {
                "filter": _when(
                    f"{not_from_epp} && response.code_details.startsWith('ext_proc_error')"
                ),
                "body_format_override": _error_body(
                    "the endpoint picker is unavailable (%RESPONSE_CODE_DETAILS%)",
                    "endpoint_picker_unavailable",
                ),
            },
            {
                "filter": _when(not_from_epp),
                "body_format_override": _error_body(
                    "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)", "gateway_error"
                ),
            },
        ]
    }


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
    epp_ping_interval_s: float = 10.0,
    epp_ping_timeout_s: float = 20.0,
) -> dict[str, Any]:
    """A complete bootstrap config (JSON-serialisable) for one gateway Envoy.

    ``forward_subset_hint`` passes the ``envoy.lb.subset_hint`` metadata that a filter
    ahead of ext_proc sets on to the EPP. Envoy pings its HTTP/2 connection to the EPP
    every ``epp_ping_interval_s`` and drops it, failing the requests on it, when a ping
    goes ``epp_ping_timeout_s`` unanswered. Envoy's per-message timeout does not cover
    FULL_DUPLEX_STREAMED streams, so without the pings an EPP that hangs (rather than
    dies) would hang every request with it. The timeout is generous because a healthy
    EPP can be stalled too (CPU throttling, a starved node), and then dropping the
    connection would fail every request in flight.
    """
    keepalive = {"interval": f"{epp_ping_interval_s:g}s", "timeout": f"{epp_ping_timeout_s:g}s"}
    epp_cluster: dict[str, Any] = {
        "name": "epp",
        "type": "STRICT_DNS" if not epp_host[:1].isdigit() else "STATIC",
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {
                    "http2_protocol_options": {"connection_keepalive": keepalive}
                },
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
        # Fail closed, with a retryable status (see the module docstring).
        "failure_mode_allow": False,
        "status_on_error": {"code": EPP_UNAVAILABLE_STATUS},
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
        # But a request must arrive in bounded time: a client sending its headers or body
        # a byte at a time would otherwise hold a stream here and one at the EPP for ever.
        # Both are disarmed once the request is complete, so long answers are unaffected.
        "request_headers_timeout": "10s",
        "request_timeout": "60s",
        "local_reply_config": _local_reply_config(),
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
        # Idle connections to the sidecars are closed here first, before the sidecar's
        # own keep-alive (sidecar.app.SERVER_KEEPALIVE_S) could close one just as Envoy
        # reuses it, which would cost that request a 503.
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "common_http_protocol_options": {"idle_timeout": f"{POD_IDLE_TIMEOUT_S}s"},
                "explicit_http_config": {"http_protocol_options": {}},
            }
        },
        "original_dst_lb_config": {
            "use_http_header": True,
            "http_header_name": DESTINATION_ENDPOINT,
        },
    }
    return {
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "static_resources": {"listeners": [listener], "clusters": [epp_cluster, pods]},
    }
