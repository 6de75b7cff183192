"""Start-up settings: llm-d compatible flags, YAML configuration and environment, one model.

Sources, strongest first:

1. command-line flags (``--name=value``, ``--name value``, ``-name``; Go style, so a
   boolean flag given bare means true and ``--flag=false`` turns it off);
2. ``--configuration`` (inline YAML) then ``--configuration-file`` (a YAML file) whose
   keys are the flag names;
3. the environment variables llm-d's sidecar reads, read as it reads them: an unusable
   value is ignored, not an error (``INFERENCE_POOL``, ``ENABLE_PREFILLER_SAMPLING``,
   ``SGLANG_BOOTSTRAP_PORT``, ``MOONCAKE_BOOTSTRAP_PORT``, ``P2P_CONNECTOR_PORT``,
   ``MORIIO_DNS_RESOLVE_TTL_SECONDS``, ``MORIIO_DNS_RESOLVE_TIMEOUT_SECONDS``);
   then ``INFERENCE_POOL_NAMESPACE``, ``INFERENCE_POOL_NAME``, ``POD_IP`` (put into a
   self-signed serving certificate), plus ``PD_SIDECAR_<FIELD>`` for every field;
4. the defaults below.

Durations accept Go syntax (``200ms``, ``1m30s``, ``1.5h``) or a plain number of seconds.
Anything unknown or invalid raises :class:`SettingsError`, which ``main`` turns into exit
status 2 with the offending flag named.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from common.durations import duration_value as parse_go_duration

__all__ = [
    "Settings",
    "SettingsError",
    "llmd_environment",
    "load_settings",
    "parse_go_bool",
    "parse_go_duration",
]

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class SettingsError(Exception):
    """Invalid start-up configuration; the message names the flag."""


def parse_go_bool(value: object) -> object:
    """Accept exactly what Go's ``strconv.ParseBool`` accepts; other values pass to pydantic."""
    if isinstance(value, str):
        if value in _GO_TRUE:
            return True
        if value in _GO_FALSE:
            return False
        raise ValueError(f"invalid boolean {value!r} (use true or false)")
    return value


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


GoBool = Annotated[bool, BeforeValidator(parse_go_bool)]
Duration = Annotated[float, BeforeValidator(parse_go_duration), Field(ge=0)]
CommaList = Annotated[list[str], BeforeValidator(_comma_list)]
Port = Annotated[int, Field(ge=0, le=65535)]

_TLS_STAGES = frozenset({"prefiller", "decoder", "encoder"})
# llm-d's --zap-log-level: a level name, or a verbosity (4 and up is debug).
_ZAP_LEVELS = {"debug": "debug", "info": "info", "warn": "warning", "error": "error"}
_ZAP_LEVELS |= {name: "error" for name in ("dpanic", "panic", "fatal")}
_EC_CONNECTORS = ("ec-example", "ec-nixl", "ec-shared-storage")


class Settings(BaseSettings):
    """Every knob of the sidecar. Field names are the flag names with ``_`` for ``-``."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix="PD_SIDECAR_",
        populate_by_name=True,
    )

    # llm-d flags (section 8 of the reference).
    port: Port = 8000
    model_server_port: Port = 8200
    kv_connector: str = "nixlv2"
    ec_connector: str = ""
    data_parallel_size: Annotated[int, Field(ge=1)] = 1
    secure_proxy: GoBool = True  # llm-d's default: HTTPS, self-signed without --cert-path
    cert_path: str = ""
    enable_ssrf_protection: GoBool = False
    inference_pool: str = ""
    inference_pool_namespace: str = Field(
        default="",
        validation_alias=AliasChoices("inference_pool_namespace", "INFERENCE_POOL_NAMESPACE"),
    )
    inference_pool_name: str = Field(
        default="",
        validation_alias=AliasChoices("inference_pool_name", "INFERENCE_POOL_NAME"),
    )
    enable_tls: CommaList = Field(default_factory=list)
    tls_insecure_skip_verify: CommaList = Field(default_factory=list)
    prefill_max_retries: Annotated[int, Field(ge=0, le=20)] = 0  # llm-d's: no retries
    prefill_retry_backoff: Duration = 0.2
    enable_prefiller_sampling: GoBool = False
    mooncake_bootstrap_port: Port = 8998
    # Ours as a flag: the prefillers' SGLang bootstrap server port (llm-d reads only its
    # SGLANG_BOOTSTRAP_PORT environment variable).
    sglang_bootstrap_port: Port = 8998
    # The InferencePool API group (--enable-ssrf-protection reads the pool through it).
    pool_group: str = "inference.networking.k8s.io"
    # Keep-alive connections per upstream host: the per-host limit of each upstream
    # connection pool (0: llm-d's default, 1024).
    max_idle_conns_per_host: Annotated[int, Field(ge=0)] = 1024
    # OpenTelemetry spans per request (sidecar.tracing); OTEL_* variables configure them.
    tracing: GoBool = False
    # The engines' OffloadingConnector P2P tier port (offloading, --enable-p2p-pull);
    # rank r of --data-parallel-size serves it on this port + r.
    p2p_connector_port: Annotated[int, Field(ge=1, le=65535)] = 7777
    # nixlv2 engines also run the OffloadingConnector P2P tier (MultiConnector): honour
    # x-kv-cache-source-host-port with a remote_kv_source pull on the prefill leg.
    enable_p2p_pull: GoBool = False
    # Chat decodes in chunks of at most this many tokens (0: off; sidecar.chunked_decode).
    decode_chunk_size: Annotated[int, Field(ge=0)] = 0
    # MoRI-IO (--kv-connector=moriio, or llm-d's nixlv2 with these flags on).
    moriio_write_mode: GoBool = False
    moriio_parallel_dispatch: GoBool = False
    moriio_parallel_decode_wait_timeout: Duration = 30.0
    moriio_local_pod_ip: str = ""
    moriio_decode_notify_port: Port = 61005
    moriio_decode_handshake_port: Port = 6301
    moriio_prefill_notify_port: Port = 61005
    moriio_prefill_handshake_port: Port = 6301
    moriio_tp_size: Annotated[int, Field(ge=1)] = 1
    moriio_dp_size: Annotated[int, Field(ge=1)] = 1
    moriio_dp_size_local: Annotated[int, Field(ge=0)] = 0
    moriio_remote_hosts: CommaList = Field(default_factory=list)
    moriio_decode_hosts: CommaList = Field(default_factory=list)
    # llm-d reads these two from MORIIO_DNS_RESOLVE_TTL_SECONDS / _TIMEOUT_SECONDS.
    moriio_dns_resolve_ttl: Annotated[float, BeforeValidator(parse_go_duration), Field(gt=0)] = 30.0
    moriio_dns_resolve_timeout: Annotated[
        float, BeforeValidator(parse_go_duration), Field(gt=0)
    ] = 5.0
    # klog verbosity of the Go sidecar (-v=N), accepted so manifests keep working:
    # 4 or more turns on debug logging.
    v: Annotated[int, Field(ge=0, le=10)] = 0
    # llm-d's logging flags (controller-runtime's zap options).
    zap_log_level: str = ""
    zap_devel: GoBool = False
    zap_encoder: Literal["json"] = "json"
    # Accepted for compatibility; our JSON log lines carry no stack traces and one time
    # format, so these change nothing.
    zap_stacktrace_level: Literal["", "info", "error", "panic"] = ""
    zap_time_encoding: Literal[
        "", "epoch", "millis", "nano", "iso8601", "rfc3339", "rfc3339nano"
    ] = ""

    # Ours (not in llm-d).
    listen_host: str = "0.0.0.0"
    metrics_port: Port = 9400
    prefill_fallback: Literal["error", "local"] = "error"
    # Trusted clients only: let request bodies carry kv_transfer_params, ec_transfer_params
    # and SGLang's bootstrap_* fields (refused with 400 by default: they pick where the
    # engines connect).
    allow_client_transfer_params: GoBool = False
    max_body_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024 * 1024
    connect_timeout: Duration = 5.0
    # A P/D request's body is buffered before any leg starts: a client trickling it (a
    # byte at a time) is answered 408 after this long instead of holding the handler.
    request_body_timeout: Duration = 60.0
    prefill_timeout: Duration = 300.0
    decode_first_byte_timeout: Duration = 600.0
    stream_idle_timeout: Duration = 120.0
    ready_cache_ttl: Duration = 1.0
    drain_timeout: Duration = 30.0
    pool_keepalive_timeout: Annotated[
        float, BeforeValidator(parse_go_duration), Field(gt=0, lt=5)
    ] = 4.0
    pool_max_connections: Annotated[int, Field(ge=16)] = 1024
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Processes serving the same ports (SO_REUSEPORT); the metrics port sums them all.
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    # SSRF protection: a static allowlist for clusters without an InferencePool, and
    # where to find the Kubernetes API (default: in-cluster, then the kubeconfig).
    ssrf_allowlist_file: str = ""
    ssrf_reload_interval: Annotated[float, BeforeValidator(parse_go_duration), Field(gt=0)] = 2.0
    kube_api_server: str = ""
    kubeconfig: str = ""
    kube_sync_timeout: Duration = 5.0  # start-up waits this long for the first listing
    # TLS: upstream verification and client certificate (mutual TLS), the pod IP put
    # into a self-signed serving certificate, and how often --cert-path is re-read.
    ca_file: str = ""
    client_cert_file: str = ""
    client_key_file: str = ""
    pod_ip: str = Field(default="", validation_alias=AliasChoices("pod_ip", "POD_IP"))
    cert_reload_interval: Annotated[float, BeforeValidator(parse_go_duration), Field(gt=0)] = 5.0

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags and YAML arrive merged as init kwargs; the environment only fills gaps.
        return (init_settings, env_settings)

    @field_validator("kv_connector")
    @classmethod
    def _known_connector(cls, value: str) -> str:
        from sidecar.connectors import available_connectors

        if value not in available_connectors():
            names = ", ".join(sorted(available_connectors()))
            raise ValueError(f"unknown KV connector {value!r} (available: {names})")
        return value

    @field_validator("inference_pool")
    @classmethod
    def _pool_ref(cls, value: str) -> str:
        if value and (value.count("/") > 1 or value.startswith("/") or value.endswith("/")):
            raise ValueError("expected namespace/name or name")
        return value

    @field_validator("pool_group")
    @classmethod
    def _known_pool_group(cls, value: str) -> str:
        from common.inference_pool import pool_version

        pool_version(value)  # raises ValueError naming an unknown group
        return value

    @field_validator("zap_log_level")
    @classmethod
    def _zap_level(cls, value: str) -> str:
        if value and value not in _ZAP_LEVELS and not (value.isascii() and value.isdigit()):
            raise ValueError(f"expected {', '.join(_ZAP_LEVELS)} or a verbosity (0, 1, ...)")
        return value

    @field_validator("ec_connector")
    @classmethod
    def _known_ec_connector(cls, value: str) -> str:
        if value not in ("", *_EC_CONNECTORS):
            names = ", ".join(_EC_CONNECTORS)
            raise ValueError(f"unknown encode connector {value!r} (available: {names})")
        return value

    @field_validator("enable_tls", "tls_insecure_skip_verify")
    @classmethod
    def _tls_stages(cls, value: list[str]) -> list[str]:
        unknown = [stage for stage in value if stage not in _TLS_STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown} (known: prefiller, decoder, encoder)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.enable_ssrf_protection:
            if self.ssrf_allowlist_file and self.pool_ref is not None:
                raise ValueError(
                    "--enable-ssrf-protection: give --inference-pool or --ssrf-allowlist-file,"
                    " not both"
                )
            if not self.ssrf_allowlist_file and self.pool_ref is None:
                raise ValueError(
                    "--enable-ssrf-protection needs --inference-pool (or INFERENCE_POOL_NAME)"
                    " or --ssrf-allowlist-file"
                )
        last = self.data_parallel_size - 1
        if self.port + last > 65535 or self.model_server_port + last > 65535:
            raise ValueError(f"--data-parallel-size {self.data_parallel_size}: ports beyond 65535")
        if self.port and abs(self.port - self.model_server_port) <= last:
            raise ValueError(
                f"--data-parallel-size {self.data_parallel_size}: the ranks' ports"
                f" {self.port}+ and model server ports {self.model_server_port}+ overlap"
            )
        if bool(self.client_cert_file) != bool(self.client_key_file):
            raise ValueError("--client-cert-file and --client-key-file go together")
        if self.p2p_connector_port + last > 65535:
            raise ValueError(
                f"--p2p-connector-port {self.p2p_connector_port} plus data-parallel rank"
                f" {last} exceeds 65535"
            )
        if self.enable_p2p_pull and self.kv_connector != "nixlv2":
            raise ValueError(
                f"--enable-p2p-pull requires --kv-connector=nixlv2 (got {self.kv_connector!r})"
            )
        self._check_moriio()
        return self

    def moriio_flags_on(self) -> list[str]:
        """The ``--moriio-*`` flags set to values that change the wire (llm-d's list)."""
        return [
            name
            for name, on in (
                ("--moriio-write-mode", self.moriio_write_mode),
                ("--moriio-parallel-dispatch", self.moriio_parallel_dispatch),
                ("--moriio-dp-size", self.moriio_dp_size > 1),
                ("--moriio-dp-size-local", self.moriio_dp_size_local > 0),
                ("--moriio-remote-hosts", bool(self.moriio_remote_hosts)),
                ("--moriio-decode-hosts", bool(self.moriio_decode_hosts)),
            )
            if on
        ]

    def _check_moriio(self) -> None:
        on = self.moriio_flags_on()
        if on and self.kv_connector not in ("nixlv2", "moriio"):
            raise ValueError(
                f"{', '.join(on)} (MoRI-IO) need --kv-connector=moriio or nixlv2"
                f" (got {self.kv_connector!r})"
            )
        if self.moriio_write_mode and not self.moriio_pod_ip:
            raise ValueError(
                "--moriio-write-mode requires --moriio-local-pod-ip (or the POD_IP"
                " environment variable): the decode pod's routable address"
            )
        if self.moriio_parallel_dispatch and not self.moriio_write_mode:
            raise ValueError("--moriio-parallel-dispatch requires --moriio-write-mode")
        for flag, hosts in (
            ("--moriio-remote-hosts", self.moriio_remote_hosts),
            ("--moriio-decode-hosts", self.moriio_decode_hosts),
        ):
            _check_wide_ep(flag, hosts, self.moriio_dp_size, self.moriio_dp_size_local)

    @property
    def moriio_pod_ip(self) -> str:
        """The decode pod's address for MoRI-IO: the flag, else ``POD_IP``."""
        return self.moriio_local_pod_ip or self.pod_ip

    @property
    def effective_kv_connector(self) -> str:
        """The connector to run: llm-d's nixlv2 with MoRI-IO flags on is ``moriio``."""
        if self.kv_connector == "nixlv2" and self.moriio_flags_on():
            return "moriio"
        return self.kv_connector

    @property
    def pool_ref(self) -> tuple[str, str] | None:
        """(namespace, name) of the InferencePool, from the flag or the environment."""
        ref = self.inference_pool or self.inference_pool_name
        if not ref:
            return None
        namespace, _, name = ref.rpartition("/")
        return (namespace or self.inference_pool_namespace or "default", name)

    @property
    def p2p_pull_available(self) -> bool:
        """Whether the engines can pull a cached prefix over the P2P tier: always with
        the offloading connector, with nixlv2 only under --enable-p2p-pull."""
        return self.kv_connector == "offloading" or (
            self.enable_p2p_pull and self.kv_connector == "nixlv2"
        )

    @property
    def effective_log_level(self) -> str:
        if self.v >= 4 or self.zap_devel:
            return "debug"
        level = self.zap_log_level
        if level.isdigit():
            return "debug" if int(level) >= 4 else self.log_level
        return _ZAP_LEVELS.get(level, self.log_level)

    @property
    def model_server_url(self) -> str:
        return self.rank_model_server_url(0)

    def rank_model_server_url(self, rank: int) -> str:
        """The local vLLM of data-parallel rank ``rank`` (https when decoder TLS is on)."""
        scheme = "https" if "decoder" in self.enable_tls else "http"
        return f"{scheme}://127.0.0.1:{self.model_server_port + rank}"


def _check_wide_ep(flag: str, hosts: list[str], dp_size: int, dp_local: int) -> None:
    """Several pods: ``dp_local`` ranks each, one host per pod (vLLM indexes the list
    by ``dp_rank // dp_size_local``). One host or none is the single-pod case."""
    if len(hosts) <= 1:
        return
    if dp_local <= 0:
        raise ValueError(
            f"{flag} has {len(hosts)} entries but --moriio-dp-size-local is {dp_local};"
            " Wide-EP over several pods needs it > 0"
        )
    if dp_size % dp_local:
        raise ValueError(
            f"--moriio-dp-size ({dp_size}) must be divisible by --moriio-dp-size-local"
            f" ({dp_local}) for Wide-EP over several pods ({flag})"
        )
    if dp_size // dp_local != len(hosts):
        raise ValueError(
            f"{flag} has {len(hosts)} entries but --moriio-dp-size / --moriio-dp-size-local"
            f" = {dp_size // dp_local}: one host per pod"
        )


# Deprecated llm-d spellings that still mean the same field.
_ALIASES = {"vllm_port": "model_server_port", "connector": "kv_connector"}
_META = frozenset({"configuration", "configuration_file"})


def _field_names() -> frozenset[str]:
    return frozenset(Settings.model_fields)


def _is_bool_field(name: str) -> bool:
    return Settings.model_fields[name].annotation is bool


def _canonical(key: str) -> str:
    name = key.strip().lstrip("-").replace("-", "_")
    return _ALIASES.get(name, name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_flags(argv: Sequence[str]) -> dict[str, Any]:
    """Go ``flag`` package semantics: ``-x``/``--x``, ``=value`` or next token."""
    known = _field_names() | _META
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            if i < len(argv):
                raise SettingsError(f"unexpected argument {argv[i]!r}")
            break
        if not token.startswith("-") or token in ("-", "---"):
            raise SettingsError(f"unexpected argument {token!r} (flags look like --name=value)")
        raw_name, has_value, raw_value = token.partition("=")
        name = _canonical(raw_name)
        if name not in known:
            raise SettingsError(f"unknown flag {raw_name}")
        if not has_value:
            if name not in _META and _is_bool_field(name):
                raw_value = "true"
            elif i < len(argv):
                raw_value = argv[i]
                i += 1
            else:
                raise SettingsError(f"flag {raw_name} needs a value")
        values[name] = raw_value
    return values


def _load_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"{origin}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{origin}: expected a mapping of flag names to values")
    known = _field_names()
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _canonical(str(key))
        if name not in known:
            raise SettingsError(f"{origin}: unknown key {key!r}")
        out[name] = value
    return out


def _describe(error: Mapping[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", ()) if not isinstance(part, int)]
    field = _ALIASES.get(loc[0], loc[0]) if loc else ""
    field = field.lower() if field.isupper() else field
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    value = error.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    return f"{_flag(field)}: {message}{shown}" if field else f"{message}{shown}"


_GO_INT = re.compile(r"[+-]?[0-9]+")
# llm-d's environment variables: each sets a default, which YAML and flags override.
_LLMD_PORT_ENV = (
    ("MOONCAKE_BOOTSTRAP_PORT", "mooncake_bootstrap_port"),
    ("SGLANG_BOOTSTRAP_PORT", "sglang_bootstrap_port"),
    ("P2P_CONNECTOR_PORT", "p2p_connector_port"),
)
# Positive whole seconds; anything else keeps the default.
_MORIIO_DNS_ENV = (
    ("MORIIO_DNS_RESOLVE_TTL_SECONDS", "moriio_dns_resolve_ttl"),
    ("MORIIO_DNS_RESOLVE_TIMEOUT_SECONDS", "moriio_dns_resolve_timeout"),
)


def llmd_environment(env: Mapping[str, str]) -> dict[str, Any]:
    """The defaults llm-d's sidecar takes from its environment, read as it reads them:
    a value Go's ParseBool or Atoi refuses is ignored (the built-in default stays)."""
    out: dict[str, Any] = {}
    pool = env.get("INFERENCE_POOL")
    if pool:
        out["inference_pool"] = pool
    sampling = env.get("ENABLE_PREFILLER_SAMPLING")
    if sampling in _GO_TRUE or sampling in _GO_FALSE:
        out["enable_prefiller_sampling"] = sampling in _GO_TRUE
    for var, field in _LLMD_PORT_ENV:
        value = env.get(var, "")
        if _GO_INT.fullmatch(value):
            out[field] = int(value)
    pod_ip = env.get("POD_IP")
    if pod_ip:
        out["pod_ip"] = pod_ip  # also MoRI-IO's decode pod address by default
    for var, field in _MORIIO_DNS_ENV:
        value = env.get(var, "")
        if _GO_INT.fullmatch(value) and int(value) > 0:
            out[field] = int(value)
    return out


def load_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Merge flags, YAML and environment into one validated :class:`Settings`."""
    flags = _parse_flags(list(sys.argv[1:] if argv is None else argv))
    merged: dict[str, Any] = llmd_environment(os.environ if env is None else env)
    file_path = flags.pop("configuration_file", None)
    inline = flags.pop("configuration", None)
    if file_path:
        try:
            text = Path(file_path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"--configuration-file: cannot read {file_path}: {exc}") from exc
        merged.update(_load_yaml(text, f"--configuration-file {file_path}"))
    if inline:
        merged.update(_load_yaml(inline, "--configuration"))
    merged.update(flags)
    try:
        return Settings(**merged)
    except ValidationError as exc:
        lines = "; ".join(_describe(err) for err in exc.errors())
        raise SettingsError(lines) from exc
