"""Command-line settings of the EPP, with the flag names of the llm-d EPP.

Flags are collected by argparse and validated by one pydantic model, ``EppSettings``;
nothing else reads the command line or the environment. Durations take Go syntax
(``50ms``, ``1m30s``) as the llm-d flags do. An invalid value exits with status 2 and
names the flag.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from epp.engine_metrics import EngineMappings, MetricSpec

__all__ = ["EppSettings", "parse_args", "parse_go_duration"]

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([a-z\u00b5\u03bc]+)")


def parse_go_duration(text: str) -> float:
    """Seconds from a Go duration string such as ``50ms``, ``1.5s`` or ``1h2m``."""
    s = text.strip()
    sign = 1.0
    if s and s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total, pos = 0.0, 0
    while pos < len(s):
        match = _PART.match(s, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r} (expected e.g. 50ms, 2s, 1m30s)")
        number, unit = match.groups()
        if unit not in _UNITS:
            raise ValueError(f"unknown unit {unit!r} in duration {text!r}")
        total += float(number) * _UNITS[unit]
        pos = match.end()
    return sign * total


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        return parse_go_duration(value)
    return value


class EppSettings(BaseModel):
    """Everything the EPP process is configured with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    grpc_port: int = Field(default=9002, ge=0, le=65535)
    grpc_health_port: int = Field(default=9003, ge=0, le=65535)
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    # Kubernetes pods listen on all interfaces; tests bind 127.0.0.1.
    bind_address: str = "0.0.0.0"
    config_file: str | None = None
    config_text: str | None = None
    pool_name: str | None = None
    pool_namespace: str = "default"
    kubeconfig: str | None = None
    refresh_metrics_interval: float = Field(default=0.05, gt=0)
    metrics_staleness_threshold: float = Field(default=2.0, gt=0)
    # Scrape budget: with many endpoints the interval stretches to stay within it.
    max_scrapes_per_second: float = Field(default=500.0, gt=0)
    # The llm-d EPP serves TLS by default; gateways connect with TLS and skip verification.
    secure_serving: bool = True
    cert_path: str | None = None
    max_request_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    decision_timeout: float = Field(default=10.0, gt=0)
    # How long in-flight streams get to finish on SIGTERM.
    shutdown_grace: float = Field(default=10.0, ge=0)
    # klog-style verbosity: 0 info, 1+ debug.
    v: int = Field(default=0, ge=0)

    # The series pods without an engine-type label are read with (llm-d's metric-name
    # flags); pods labelled llm-d.ai/engine-type=sglang (etc.) use their engine's names.
    total_queued_requests_metric: str = "vllm:num_requests_waiting"
    total_running_requests_metric: str = "vllm:num_requests_running"
    kv_cache_usage_percentage_metric: str = "vllm:kv_cache_usage_perc"
    lora_info_metric: str = "vllm:lora_requests_info"
    cache_info_metric: str = "vllm:cache_config_info"

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

    _durations = field_validator(
        "refresh_metrics_interval", "metrics_staleness_threshold", "decision_timeout",
        "shutdown_grace", mode="before",
    )(_duration)  # fmt: skip

    @field_validator("config_file", "config_text", "pool_name", "cert_path", "kubeconfig")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.config_file and self.config_text:
            raise ValueError("--config-file and --config-text are mutually exclusive")
        if self.cert_path and not self.secure_serving:
            raise ValueError("--cert-path needs --secure-serving")
        ports = [p for p in (self.grpc_port, self.grpc_health_port, self.metrics_port) if p]
        if len(set(ports)) != len(ports):
            raise ValueError("--grpc-port, --grpc-health-port and --metrics-port must differ")
        return self


# flag -> help; every flag maps to the EppSettings field of the same name (dashes -> _).
_FLAGS: dict[str, str] = {
    "grpc-port": "gRPC port of the ext_proc service (default 9002)",
    "grpc-health-port": "gRPC health service port (default 9003)",
    "metrics-port": "Prometheus metrics port (default 9090)",
    "bind-address": "address the servers listen on (default 0.0.0.0)",
    "config-file": "EndpointPickerConfig file (YAML or JSON)",
    "config-text": "EndpointPickerConfig as text",
    "pool-name": "InferencePool to serve (Kubernetes discovery)",
    "pool-namespace": "namespace of the InferencePool (default 'default')",
    "kubeconfig": "kubeconfig file (default: in-cluster configuration)",
    "refresh-metrics-interval": "endpoint /metrics scrape interval, Go duration (default 50ms)",
    "metrics-staleness-threshold": "age after which endpoint metrics are stale (default 2s)",
    "max-scrapes-per-second": "scrape budget; the interval stretches past it (default 500)",
    "secure-serving": "serve the ext_proc service over TLS (default true)",
    "cert-path": "directory with tls.crt and tls.key (default: a self-signed certificate)",
    "max-request-body-bytes": "largest request body accepted (default 32 MiB)",
    "decision-timeout": "upper bound of one scheduling decision (default 10s)",
    "shutdown-grace": "time in-flight requests get on SIGTERM (default 10s)",
    "v": "log verbosity (0 info, 1 and up debug)",
    "total-queued-requests-metric": "queue series of pods with no engine label (vLLM's)",
    "total-running-requests-metric": "running-batch series of pods with no engine label",
    "kv-cache-usage-percentage-metric": "KV-cache usage (0..1) series, pods with no engine label",
    "lora-info-metric": "LoRA adapters series (vLLM label format), pods with no engine label",
    "cache-info-metric": "KV-cache geometry series, pods with no engine label",
}
_BOOL_FLAGS = {"secure-serving"}


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
    for flag, help_text in _FLAGS.items():
        if flag in _BOOL_FLAGS:
            # Go bool flags: --flag means true, --flag=false turns it off.
            parser.add_argument(
                f"--{flag}", nargs="?", const="true", metavar="BOOL", help=help_text
            )
        else:
            parser.add_argument(f"--{flag}", metavar="VALUE", help=help_text)
    return parser


def _normalise(argv: Sequence[str]) -> list[str]:
    """Accept Go's single-dash long flags (``-pool-name``) as well."""
    out = []
    for arg in argv:
        name = arg[1:].split("=", 1)[0]
        if arg.startswith("-") and not arg.startswith("--") and name in _FLAGS:
            arg = "-" + arg
        out.append(arg)
    return out


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
