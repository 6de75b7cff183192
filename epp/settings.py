"""Command-line settings of the EPP, with the flags of the llm-d EPP.

Every flag of llm-d's EPP (``pkg/epp/server/options.go``, plus the controller-runtime
zap logging flags and ``-v``) is accepted here with its meaning; a few more belong to
this EPP alone (``--bind-address``, ``--kubeconfig``, ``--max-request-body-bytes``,
``--decision-timeout``, ``--shutdown-grace``, ``--max-scrapes-per-second``,
``--validate-config``). Flags are collected by argparse and validated by one pydantic
model, ``EppSettings``; nothing else reads the command line. Durations take Go syntax
(``50ms``, ``1m30s``), sizes Kubernetes quantities (``10Mi``, ``25MB``), booleans Go's
spellings (``--flag``, ``--flag=false``). An invalid value exits with status 2 and names
the flag.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.durations import parse_go_duration
from epp.discovery.selector import parse_selector
from epp.engine_metrics import EngineMappings, MetricSpec

__all__ = [
    "DEFAULT_POOL_GROUP",
    "FLAGS",
    "EppSettings",
    "parse_args",
    "parse_go_bool",
    "parse_quantity",
]

log = logging.getLogger("epp.settings")

DEFAULT_POOL_GROUP = "inference.networking.k8s.io"
# The InferencePool API groups this EPP reads: v1, and the older v1alpha2 group.
POOL_GROUPS = (DEFAULT_POOL_GROUP, "inference.networking.x-k8s.io")
# llm-d clamps a shorter scrape interval to this.
MIN_REFRESH_METRICS_INTERVAL = 0.05

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_go_bool(text: str) -> bool:
    """A boolean as Go's ``strconv.ParseBool`` reads it."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid boolean {text!r} (expected true or false)")


_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:([eE][+-]?\d+)|([KMGTPE]i?|[kmun])?)$")
_SUFFIXES = {
    "": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9,
    "T": 1e12, "P": 1e15, "E": 1e18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def parse_quantity(text: str) -> int:
    """Bytes from a Kubernetes quantity (``10Mi``, ``25M``), a trailing ``B`` allowed.

    As llm-d reads ``--grpc-max-*-msg-size``: ``25MB`` is 25 * 10^6, ``10MiB`` 10 * 2^20.
    """
    s = text.strip()
    if len(s) > 1 and s[-1] in "Bb":
        s = s[:-1]
    match = _QUANTITY.match(s)
    if match is None:
        raise ValueError(f"invalid size {text!r} (expected e.g. 4194304, 10Mi, 25MB)")
    number, exponent, suffix = match.groups()
    value = float(number) * (10 ** int(exponent[1:]) if exponent else _SUFFIXES[suffix or ""])
    if value < 0:
        raise ValueError(f"size {text!r} must be non-negative")
    return int(value + 0.999999) if value % 1 else int(value)


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        return parse_go_duration(value)
    return value


def _go_bool(value: Any) -> Any:
    if isinstance(value, str):
        return parse_go_bool(value)
    return value


def _size(value: Any) -> Any:
    if isinstance(value, str):
        return parse_quantity(value) if value.strip() else None
    return value


def _csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


TlsVersion = Literal["VersionTLS10", "VersionTLS11", "VersionTLS12", "VersionTLS13"]
ZapEncoder = Literal["json", "console"]
_ZAP_LEVELS = ("debug", "info", "warn", "error", "dpanic", "panic", "fatal")
_TIME_ENCODINGS = ("epoch", "millis", "nano", "iso8601", "rfc3339", "rfc3339nano")


class EppSettings(BaseModel):
    """Everything the EPP process is configured with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- ext_proc ---------------------------------------------------------------------
    grpc_port: int = Field(default=9002, ge=0, le=65535)
    grpc_health_port: int = Field(default=9003, ge=0, le=65535)
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    # Kubernetes pods listen on all interfaces; tests bind 127.0.0.1.
    bind_address: str = "0.0.0.0"
    ha_enable_leader_election: bool = False
    # On SIGTERM: readiness goes NOT_SERVING and the lease is released at once, ext_proc
    # keeps serving this long, then in-flight streams get --shutdown-grace to finish.
    drain_timeout: float = Field(default=30.0, ge=0)
    shutdown_grace: float = Field(default=10.0, ge=0)
    # None: derived from --max-request-body-bytes (a whole BUFFERED body fits).
    grpc_max_recv_msg_size: int | None = Field(default=None, ge=0)
    grpc_max_send_msg_size: int | None = Field(default=None, ge=0)
    max_request_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    decision_timeout: float = Field(default=10.0, gt=0)
    disable_endpoint_subset_filter: bool = False
    emit_endpoint_scores: bool = False
    health_checking: bool = False
    enable_grpc_stream_metrics: bool = False

    # -- endpoints ----------------------------------------------------------------------
    pool_name: str | None = None
    # None: the NAMESPACE environment variable, else "default" (as llm-d resolves it).
    pool_namespace: str | None = None
    pool_group: str = DEFAULT_POOL_GROUP
    endpoint_selector: str | None = None
    endpoint_target_ports: tuple[int, ...] = ()
    kubeconfig: str | None = None
    # InferenceObjective/InferenceModelRewrite objects from a YAML file (not the API).
    api_objects_file: str | None = None
    refresh_metrics_interval: float = Field(default=0.05, gt=0)
    refresh_prometheus_metrics_interval: float = Field(default=5.0, gt=0)
    metrics_staleness_threshold: float = Field(default=2.0, gt=0)
    # Scrape budget: with many endpoints the interval stretches to stay within it.
    max_scrapes_per_second: float = Field(default=500.0, gt=0)
    # The series pods without an engine-type label are read with (llm-d's metric-name
    # flags); pods labelled llm-d.ai/engine-type=sglang (etc.) use their engine's names.
    total_queued_requests_metric: str = "vllm:num_requests_waiting"
    total_running_requests_metric: str = "vllm:num_requests_running"
    kv_cache_usage_percentage_metric: str = "vllm:kv_cache_usage_perc"
    lora_info_metric: str = "vllm:lora_requests_info"
    cache_info_metric: str = "vllm:cache_config_info"

    # -- diagnostics --------------------------------------------------------------------
    # klog-style verbosity as llm-d uses it: 2 is the default, 4 debug, 5 trace.
    v: int = Field(default=2, ge=0)
    zap_devel: bool = True
    zap_encoder: ZapEncoder | None = None
    zap_log_level: str | None = None
    zap_stacktrace_level: str | None = None
    zap_time_encoding: str | None = None
    tracing: bool = True
    enable_pprof: bool = True
    metrics_endpoint_auth: bool = True
    metrics_client_ca_file: str | None = None
    metrics_cert_dir: str | None = None
    # The llm-d EPP serves TLS by default; gateways connect with TLS and skip verification.
    secure_serving: bool = True
    cert_path: str | None = None
    enable_cert_reload: bool = False
    tls_min_version: TlsVersion | None = None
    tls_cipher_suites: tuple[str, ...] = ()

    # -- configuration ------------------------------------------------------------------
    config_file: str | None = None
    config_text: str | None = None
    allow_experimental_plugins: bool = False
    validate_config: bool = False

    # -- leader election timing (controller-runtime's defaults; not flags) --------------
    leader_lease_duration: float = Field(default=15.0, gt=0)
    leader_renew_deadline: float = Field(default=10.0, gt=0)
    leader_retry_period: float = Field(default=2.0, gt=0)

    _durations = field_validator(
        "refresh_metrics_interval", "refresh_prometheus_metrics_interval",
        "metrics_staleness_threshold", "decision_timeout", "shutdown_grace", "drain_timeout",
        mode="before",
    )(_duration)  # fmt: skip
    _bools = field_validator(
        "ha_enable_leader_election", "disable_endpoint_subset_filter", "emit_endpoint_scores",
        "health_checking", "enable_grpc_stream_metrics", "zap_devel", "tracing",
        "enable_pprof", "metrics_endpoint_auth", "secure_serving", "enable_cert_reload",
        "allow_experimental_plugins", "validate_config",
        mode="before",
    )(_go_bool)  # fmt: skip
    _sizes = field_validator("grpc_max_recv_msg_size", "grpc_max_send_msg_size", mode="before")(
        _size
    )
    _lists = field_validator("tls_cipher_suites", mode="before")(_csv)

    @field_validator(
        "total_queued_requests_metric", "total_running_requests_metric",
        "kv_cache_usage_percentage_metric", "lora_info_metric", "cache_info_metric",
    )  # fmt: skip
    @classmethod
    def _metric_selector(cls, value: str) -> str:
        MetricSpec.parse(value)
        return value

    def engine_metrics(self) -> EngineMappings:
        """The built-in engines, the default one read with the metric-name flags."""
        return EngineMappings().with_default_names(
            queued=self.total_queued_requests_metric,
            running=self.total_running_requests_metric,
            kv_usage=self.kv_cache_usage_percentage_metric,
            lora=self.lora_info_metric,
            cache_info=self.cache_info_metric,
        )

    @field_validator(
        "config_file", "config_text", "pool_name", "cert_path", "kubeconfig", "pool_namespace",
        "endpoint_selector", "metrics_client_ca_file", "metrics_cert_dir", "zap_log_level",
        "zap_stacktrace_level", "zap_time_encoding", "zap_encoder", "tls_min_version",
        "api_objects_file", mode="before",
    )  # fmt: skip
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return value or None

    @field_validator("zap_log_level")
    @classmethod
    def _zap_level(cls, value: str | None) -> str | None:
        if value is None or value.lower() in _ZAP_LEVELS:
            return value.lower() if value else value
        if value.isdigit() and int(value) > 0:
            return value
        raise ValueError(
            f"invalid log level {value!r} (debug, info, warn, error, panic or an integer > 0)"
        )

    @field_validator("zap_stacktrace_level")
    @classmethod
    def _stack_level(cls, value: str | None) -> str | None:
        if value is None or value.lower() in _ZAP_LEVELS:
            return value.lower() if value else value
        raise ValueError(f"invalid stacktrace level {value!r} (info, warn, error or panic)")

    @field_validator("zap_time_encoding")
    @classmethod
    def _time_encoding(cls, value: str | None) -> str | None:
        if value is None or value.lower() in _TIME_ENCODINGS:
            return value.lower() if value else value
        raise ValueError(f"invalid time encoding {value!r} ({', '.join(_TIME_ENCODINGS)})")

    @field_validator("pool_group")
    @classmethod
    def _pool_group(cls, value: str) -> str:
        if value not in POOL_GROUPS:
            raise ValueError(f"unsupported InferencePool group {value!r}; use {DEFAULT_POOL_GROUP}")
        return value

    @field_validator("endpoint_target_ports", mode="before")
    @classmethod
    def _ports(cls, value: Any) -> Any:
        value = _csv(value)
        if isinstance(value, tuple | list):
            ports = []
            for item in value:
                try:
                    port = int(item)
                except (TypeError, ValueError):
                    raise ValueError(f"invalid port {item!r}") from None
                if not 0 < port <= 65535:
                    raise ValueError(f"invalid port number {port}")
                if port not in ports:  # duplicates dropped, as llm-d does
                    ports.append(port)
            return tuple(ports)
        return value

    @field_validator("endpoint_selector")
    @classmethod
    def _selector(cls, value: str | None) -> str | None:
        if value is not None:
            parse_selector(value)
        return value

    @field_validator("tls_cipher_suites")
    @classmethod
    def _ciphers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name not in GO_CIPHER_SUITES:
                raise ValueError(f"unknown cipher suite {name!r}")
        return value

    @field_validator("refresh_metrics_interval")
    @classmethod
    def _clamp_interval(cls, value: float) -> float:
        if value < MIN_REFRESH_METRICS_INTERVAL:
            log.warning(
                "--refresh-metrics-interval %.3fs is below the minimum; using %.3fs",
                value,
                MIN_REFRESH_METRICS_INTERVAL,
            )
            return MIN_REFRESH_METRICS_INTERVAL
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.config_file and self.config_text:
            raise ValueError("--config-file and --config-text are mutually exclusive")
        if self.cert_path and not self.secure_serving:
            raise ValueError("--cert-path needs --secure-serving")
        if self.enable_cert_reload and not self.cert_path:
            raise ValueError("--enable-cert-reload needs --cert-path")
        if self.pool_name and self.endpoint_selector:
            raise ValueError("--pool-name and --endpoint-selector are mutually exclusive")
        if self.endpoint_selector and not 1 <= len(self.endpoint_target_ports) <= 8:
            raise ValueError("--endpoint-selector needs --endpoint-target-ports (1 to 8 ports)")
        if self.endpoint_target_ports and not self.endpoint_selector:
            raise ValueError("--endpoint-target-ports needs --endpoint-selector")
        if self.metrics_client_ca_file and not self.metrics_cert_dir:
            raise ValueError('"metrics-client-ca-file" requires "metrics-cert-dir"')
        if self.metrics_cert_dir and not (
            self.metrics_client_ca_file or self.metrics_endpoint_auth
        ):
            raise ValueError(
                '"metrics-cert-dir" enables metrics TLS without authentication; set '
                '"metrics-client-ca-file" or "metrics-endpoint-auth"'
            )
        if self.leader_renew_deadline >= self.leader_lease_duration:
            raise ValueError("the lease renew deadline must be shorter than the lease duration")
        ports = [p for p in (self.grpc_port, self.grpc_health_port, self.metrics_port) if p]
        if len(set(ports)) != len(ports):
            raise ValueError("--grpc-port, --grpc-health-port and --metrics-port must differ")
        return self

    # -- derived values -----------------------------------------------------------------

    @property
    def namespace(self) -> str:
        """The pool's namespace: the flag, else $NAMESPACE, else ``default``."""
        return self.pool_namespace or os.environ.get("NAMESPACE") or "default"

    @property
    def kubernetes_needed(self) -> bool:
        """Whether this configuration talks to the Kubernetes API at all."""
        return bool(
            self.pool_name
            or self.endpoint_selector
            or self.ha_enable_leader_election
            or self.metrics_endpoint_auth
        )

    @property
    def recv_limit(self) -> int:
        """Largest gRPC message the ext_proc server takes."""
        if self.grpc_max_recv_msg_size:
            return self.grpc_max_recv_msg_size
        # BUFFERED mode sends the whole body in one message, plus the rest of it.
        return self.max_request_body_bytes + 1024 * 1024

    @property
    def send_limit(self) -> int:
        if self.grpc_max_send_msg_size:
            return self.grpc_max_send_msg_size
        return self.max_request_body_bytes + 1024 * 1024


# The cipher suites Go's crypto/tls names, as OpenSSL spells them. TLS 1.3 suites are
# not configurable (in Go or here); naming one is accepted and changes nothing.
GO_CIPHER_SUITES: dict[str, str | None] = {
    "TLS_RSA_WITH_RC4_128_SHA": "RC4-SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA": "ECDHE-ECDSA-RC4-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA": "ECDHE-RSA-RC4-SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": "ECDHE-RSA-DES-CBC3-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}
TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "VersionTLS10": ssl.TLSVersion.TLSv1,
    "VersionTLS11": ssl.TLSVersion.TLSv1_1,
    "VersionTLS12": ssl.TLSVersion.TLSv1_2,
    "VersionTLS13": ssl.TLSVersion.TLSv1_3,
}


@dataclass(frozen=True, slots=True)
class Flag:
    """One command-line flag: its name (the field is the name with ``_``), kind, help."""

    name: str
    help: str
    kind: Literal["value", "bool"] = "value"
    # Go-only flags are accepted and said once in the log to change nothing here.
    go_only: bool = False

    @property
    def field(self) -> str:
        return self.name.replace("-", "_")


FLAGS: tuple[Flag, ...] = (
    # ext_proc
    Flag("grpc-port", "gRPC port of the ext_proc service (default 9002)"),
    Flag("grpc-health-port", "gRPC health service port (default 9003)"),
    Flag("metrics-port", "Prometheus metrics port (default 9090)"),
    Flag("ha-enable-leader-election", "Kubernetes Lease leader election: only the leader "
         "reports ready (default false)", "bool"),
    Flag("drain-timeout", "on SIGTERM, keep serving ext_proc this long while not ready "
         "(default 30s)"),
    Flag("grpc-max-recv-msg-size", "largest gRPC message received, e.g. 10Mi, 25MB "
         "(default: --max-request-body-bytes + 1Mi)"),
    Flag("grpc-max-send-msg-size", "largest gRPC message sent (default as the receive limit)"),
    Flag("disable-endpoint-subset-filter", "ignore the gateway's endpoint subset hint",
         "bool"),
    Flag("emit-endpoint-scores", "add the primary profile's endpoint scores to the envoy.lb "
         "metadata (x-gateway-destination-endpoint-scores)", "bool"),
    Flag("health-checking", "also serve grpc.health.v1 on the ext_proc port", "bool"),
    Flag("enable-grpc-stream-metrics", "export the ext_proc stream metrics", "bool"),
    # endpoints
    Flag("pool-name", "InferencePool to serve (Kubernetes discovery)"),
    Flag("pool-namespace", "namespace of the pool or selected pods (default $NAMESPACE, "
         "else 'default')"),
    Flag("pool-group", f"API group of the InferencePool (default {DEFAULT_POOL_GROUP})"),
    Flag("endpoint-selector", "label selector of the model server pods, instead of an "
         "InferencePool (e.g. 'app=vllm,env in (prod)')"),
    Flag("endpoint-target-ports", "ports of the selected pods, comma separated (e.g. 8000)"),
    Flag("kubeconfig", "kubeconfig file (default: in-cluster configuration)"),
    Flag("api-objects-file", "YAML of InferenceObjective and InferenceModelRewrite objects, "
         "re-read when it changes (instead of watching them on the Kubernetes API)"),
    Flag("refresh-metrics-interval", "endpoint /metrics scrape interval, Go duration "
         "(default and minimum 50ms)"),
    Flag("refresh-prometheus-metrics-interval", "interval of the pool metric gauges "
         "(default 5s)"),
    Flag("metrics-staleness-threshold", "age after which endpoint metrics are stale "
         "(default 2s)"),
    Flag("max-scrapes-per-second", "scrape budget; the interval stretches past it "
         "(default 500)"),
    Flag("total-queued-requests-metric", "queue series of pods with no engine label "
         "(vLLM's)"),
    Flag("total-running-requests-metric", "running-batch series of pods with no engine "
         "label"),
    Flag("kv-cache-usage-percentage-metric", "KV-cache usage (0..1) series, pods with no "
         "engine label"),
    Flag("lora-info-metric", "LoRA adapters series (vLLM label format), pods with no engine "
         "label"),
    Flag("cache-info-metric", "KV-cache geometry series, pods with no engine label"),
    # diagnostics
    Flag("v", "log verbosity: 2 default, 4 and up debug"),
    Flag("zap-devel", "development logging: console encoder, stack traces from warnings "
         "(default true)", "bool"),
    Flag("zap-encoder", "log encoding: json or console"),
    Flag("zap-log-level", "log level: debug, info, warn, error, panic, or an integer "
         "verbosity (default from -v)"),
    Flag("zap-stacktrace-level", "level from which records carry a stack trace"),
    Flag("zap-time-encoding", "log time format: epoch, millis, nano, iso8601, rfc3339, "
         "rfc3339nano"),
    Flag("tracing", "OpenTelemetry spans, configured by OTEL_* variables (default true)",
         "bool"),
    Flag("enable-pprof", "Go pprof handlers (no effect here)", "bool", go_only=True),
    Flag("metrics-endpoint-auth", "authenticate /metrics callers with TokenReview and "
         "SubjectAccessReview (default true)", "bool"),
    Flag("metrics-client-ca-file", "PEM CA: /metrics requires verified client certificates"),
    Flag("metrics-cert-dir", "directory with tls.crt and tls.key: /metrics over TLS"),
    Flag("secure-serving", "serve the ext_proc service over TLS (default true)", "bool"),
    Flag("cert-path", "directory with tls.crt and tls.key (default: a self-signed "
         "certificate)"),
    Flag("enable-cert-reload", "reload --cert-path when its files change", "bool"),
    Flag("tls-min-version", "minimum TLS version (VersionTLS10..13); gRPC serves TLS 1.2 "
         "and 1.3, so 1.2 is the floor and VersionTLS13 is refused at start"),
    Flag("tls-cipher-suites", "TLS 1.2 cipher suites, Go names, comma separated"),
    Flag("bind-address", "address the servers listen on (default 0.0.0.0)"),
    # configuration
    Flag("config-file", "EndpointPickerConfig file (YAML or JSON)"),
    Flag("config-text", "EndpointPickerConfig as text"),
    Flag("allow-experimental-plugins", "allow plugins llm-d marks Alpha", "bool"),
    Flag("validate-config", "load and build the configuration, print it, and exit", "bool"),
    Flag("max-request-body-bytes", "largest request body accepted (default 32 MiB)"),
    Flag("decision-timeout", "upper bound of one scheduling decision (default 10s)"),
    Flag("shutdown-grace", "after the drain, time in-flight requests get (default 10s)"),
)  # fmt: skip
_BY_NAME = {flag.name: flag for flag in FLAGS}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> _Parser:
    parser = _Parser(
        prog="epp",
        description="Envoy ext_proc endpoint picker for P/D serving.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    for flag in FLAGS:
        names = ("-v", "--v") if flag.name == "v" else (f"--{flag.name}",)
        if flag.kind == "bool":
            # Go bool flags: --flag means true, --flag=false turns it off.
            parser.add_argument(
                *names, dest=flag.field, nargs="?", const="true", metavar="BOOL",
                help=flag.help,
            )  # fmt: skip
        else:
            parser.add_argument(*names, dest=flag.field, metavar="VALUE", help=flag.help)
    return parser


def _normalise(argv: Sequence[str]) -> list[str]:
    """Accept Go's single-dash long flags (``-pool-name``, ``-v=2``) as well."""
    out = []
    for arg in argv:
        name = arg[1:].split("=", 1)[0]
        if arg.startswith("-") and not arg.startswith("--") and name in _BY_NAME:
            arg = "-" + arg
        out.append(arg)
    return out


def explicit_flags(settings: EppSettings) -> set[str]:
    """The flags given on the command line (or fields set by the caller)."""
    return {name.replace("_", "-") for name in settings.model_fields_set}


def parse_args(argv: Sequence[str] | None = None) -> EppSettings:
    """Settings from the command line; exits with status 2 naming the bad flag."""
    parser = _parser()
    values = vars(parser.parse_args(_normalise(sys.argv[1:] if argv is None else argv)))
    try:
        return EppSettings.model_validate(values)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ", ".join(f"--{str(loc).replace('_', '-')}" for loc in e["loc"])
            message = e["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        parser.error("; ".join(problems))
