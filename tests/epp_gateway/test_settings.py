"""Flags as the llm-d EPP names them, Go durations, and exit status 2 naming the flag."""

from __future__ import annotations

import pytest

from common.durations import parse_go_duration
from epp.settings import FLAGS, EppSettings, parse_args, parse_quantity

# The flags llm-d's EPP registers in pkg/epp/server/options.go (llm-d-router ebab687),
# and the logging flags it binds: controller-runtime's zap flags and klog's -v.
LLM_D_FLAGS = {
    "grpc-port", "ha-enable-leader-election", "drain-timeout", "grpc-max-recv-msg-size",
    "grpc-max-send-msg-size", "pool-group", "pool-namespace", "pool-name", "endpoint-selector",
    "endpoint-target-ports", "disable-endpoint-subset-filter", "emit-endpoint-scores",
    "refresh-metrics-interval", "refresh-prometheus-metrics-interval",
    "metrics-staleness-threshold", "total-queued-requests-metric",
    "total-running-requests-metric", "kv-cache-usage-percentage-metric", "lora-info-metric",
    "cache-info-metric", "tracing", "health-checking", "metrics-port", "grpc-health-port",
    "enable-pprof", "cert-path", "enable-cert-reload", "enable-grpc-stream-metrics",
    "secure-serving", "tls-min-version", "tls-cipher-suites", "metrics-endpoint-auth",
    "metrics-client-ca-file", "metrics-cert-dir", "config-file", "config-text",
    "allow-experimental-plugins",
    "v", "zap-devel", "zap-encoder", "zap-log-level", "zap-stacktrace-level",
    "zap-time-encoding",
}  # fmt: skip
# The deprecated metric-name flags are another part of the EPP's.
NOT_HERE = {
    "total-queued-requests-metric",
    "total-running-requests-metric",
    "kv-cache-usage-percentage-metric",
    "lora-info-metric",
    "cache-info-metric",
}


def test_defaults_are_the_llm_d_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NAMESPACE", raising=False)
    s = parse_args([])
    assert (s.grpc_port, s.grpc_health_port, s.metrics_port) == (9002, 9003, 9090)
    assert s.refresh_metrics_interval == pytest.approx(0.05)
    assert s.refresh_prometheus_metrics_interval == pytest.approx(5.0)
    assert s.metrics_staleness_threshold == pytest.approx(2.0)
    assert s.drain_timeout == pytest.approx(30.0)
    assert s.secure_serving is True
    assert s.tracing is True
    assert s.metrics_endpoint_auth is True
    assert s.enable_pprof is True
    assert s.ha_enable_leader_election is False
    assert s.pool_group == "inference.networking.k8s.io"
    assert s.namespace == "default"
    assert s.v == 2 and s.zap_devel is True


def test_pool_namespace_falls_back_to_the_namespace_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NAMESPACE", "from-env")
    assert parse_args([]).namespace == "from-env"
    assert parse_args(["--pool-namespace", "flag"]).namespace == "flag"


def test_every_llm_d_flag_is_accepted() -> None:
    missing = LLM_D_FLAGS - NOT_HERE - {flag.name for flag in FLAGS}
    assert not missing, f"llm-d flags epp does not accept: {sorted(missing)}"
    for name in LLM_D_FLAGS - NOT_HERE:
        flag = next(f for f in FLAGS if f.name == name)
        assert flag.field in EppSettings.model_fields, name


def test_every_flag() -> None:
    s = parse_args(
        [
            "--grpc-port=1",
            "--grpc-health-port", "2",
            "--metrics-port", "3",
            "--config-file", "/etc/epp/config.yaml",
            "--pool-name", "pool",
            "--pool-namespace", "ns",
            "--pool-group", "inference.networking.k8s.io",
            "--refresh-metrics-interval", "100ms",
            "--refresh-prometheus-metrics-interval=10s",
            "--metrics-staleness-threshold", "1m30s",
            "--secure-serving=false",
            "--ha-enable-leader-election",
            "--drain-timeout=5s",
            "--grpc-max-recv-msg-size", "10MiB",
            "--grpc-max-send-msg-size=25MB",
            "--disable-endpoint-subset-filter",
            "--emit-endpoint-scores=true",
            "--health-checking",
            "--enable-grpc-stream-metrics",
            "--tracing=false",
            "--enable-pprof=false",
            "--metrics-endpoint-auth=false",
            "--allow-experimental-plugins",
            "--tls-min-version", "VersionTLS12",
            "--tls-cipher-suites", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,"
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            "--zap-encoder", "json",
            "--zap-log-level", "debug",
            "--zap-devel=false",
            "--zap-stacktrace-level", "error",
            "--zap-time-encoding", "iso8601",
            "--v", "4",
        ]
    )  # fmt: skip
    assert (s.grpc_port, s.grpc_health_port, s.metrics_port) == (1, 2, 3)
    assert s.config_file == "/etc/epp/config.yaml"
    assert (s.pool_name, s.namespace) == ("pool", "ns")
    assert s.refresh_metrics_interval == pytest.approx(0.1)
    assert s.refresh_prometheus_metrics_interval == pytest.approx(10.0)
    assert s.metrics_staleness_threshold == pytest.approx(90.0)
    assert s.secure_serving is False and s.tracing is False
    assert s.ha_enable_leader_election and s.drain_timeout == pytest.approx(5.0)
    assert (s.grpc_max_recv_msg_size, s.grpc_max_send_msg_size) == (10 * 2**20, 25_000_000)
    assert (s.recv_limit, s.send_limit) == (10 * 2**20, 25_000_000)
    assert s.disable_endpoint_subset_filter and s.emit_endpoint_scores and s.health_checking
    assert s.enable_grpc_stream_metrics and s.allow_experimental_plugins
    assert not s.enable_pprof and not s.metrics_endpoint_auth
    assert s.tls_min_version == "VersionTLS12"
    assert s.tls_cipher_suites == (
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    )
    assert (s.zap_encoder, s.zap_log_level, s.zap_devel) == ("json", "debug", False)
    assert (s.zap_stacktrace_level, s.zap_time_encoding, s.v) == ("error", "iso8601", 4)


def test_endpoint_selector_and_ports() -> None:
    s = parse_args(
        ["--endpoint-selector", "app=vllm,env in (prod,staging),!legacy",
         "--endpoint-target-ports", "8000,8001,8000"]
    )  # fmt: skip
    assert s.endpoint_selector == "app=vllm,env in (prod,staging),!legacy"
    assert s.endpoint_target_ports == (8000, 8001)  # duplicates dropped, as llm-d does


def test_go_style_single_dash_and_bare_bool() -> None:
    s = parse_args(["-pool-name=p", "-secure-serving", "-cert-path", "/certs", "-v=1"])
    assert s.pool_name == "p"
    assert s.secure_serving is True
    assert s.cert_path == "/certs"
    assert s.v == 1
    assert parse_args(["-v", "5"]).v == 5


def test_refresh_interval_below_the_minimum_is_clamped() -> None:
    assert parse_args(["--refresh-metrics-interval=10ms"]).refresh_metrics_interval == 0.05


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("50ms", 0.05), ("2s", 2.0), ("1.5s", 1.5), ("1h2m3s", 3723.0), ("0", 0.0),
     ("250us", 0.00025), ("10\u00b5s", 0.00001), ("100ns", 1e-7), (".5m", 30.0)],
)  # fmt: skip
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "ms", "5 s", "1d", "1s2", "abc"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|unit"):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("4194304", 4194304), ("10Mi", 10 * 2**20), ("10MiB", 10 * 2**20), ("25MB", 25_000_000),
     ("1Gi", 2**30), ("2k", 2000), ("1e3", 1000)],
)  # fmt: skip
def test_quantities(text: str, size: int) -> None:
    assert parse_quantity(text) == size


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--grpc-port", "http"], "--grpc-port"),
        (["--grpc-port", "70000"], "--grpc-port"),
        (["--refresh-metrics-interval", "5"], "--refresh-metrics-interval"),
        (["--metrics-staleness-threshold", "-1s"], "--metrics-staleness-threshold"),
        (["--secure-serving=maybe"], "--secure-serving"),
        (["--tracing=yes"], "--tracing"),
        (["--config-file", "a", "--config-text", "b"], "mutually exclusive"),
        (["--grpc-port", "9003"], "must differ"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--pool-group", "example.com"], "--pool-group"),
        (["--zap-encoder", "xml"], "--zap-encoder"),
        (["--zap-log-level", "loud"], "--zap-log-level"),
        (["--zap-log-level", "0"], "--zap-log-level"),
        (["--zap-time-encoding", "unix"], "--zap-time-encoding"),
        (["--grpc-max-recv-msg-size", "lots"], "--grpc-max-recv-msg-size"),
        (["--tls-min-version", "TLS1.2"], "--tls-min-version"),
        (["--tls-cipher-suites", "TLS_FAST"], "--tls-cipher-suites"),
        (["--endpoint-selector", "app in prod"], "--endpoint-selector"),
        (["--endpoint-selector", "app=vllm"], "--endpoint-target-ports"),
        (["--endpoint-selector", "a=b", "--endpoint-target-ports", "x"], "--endpoint-target-ports"),
        (["--endpoint-selector", "a=b", "--endpoint-target-ports", "1,2,3,4,5,6,7,8,9"],
         "1 to 8"),
        (["--pool-name", "p", "--endpoint-selector", "a=b", "--endpoint-target-ports", "1"],
         "mutually exclusive"),
        (["--metrics-client-ca-file", "/ca.pem"], "metrics-cert-dir"),
        (["--metrics-cert-dir", "/d", "--metrics-endpoint-auth=false"], "without authentication"),
        (["--enable-cert-reload"], "--cert-path"),
    ],
)  # fmt: skip
def test_bad_values_exit_2_naming_the_flag(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert named in capsys.readouterr().err


def test_settings_are_immutable() -> None:
    s = EppSettings()
    with pytest.raises(ValueError, match="frozen"):
        s.grpc_port = 1  # type: ignore[misc]
