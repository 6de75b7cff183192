"""Flags as the llm-d EPP names them, Go durations, and exit status 2 naming the flag."""

from __future__ import annotations

import pytest

from epp.settings import EppSettings, parse_args, parse_go_duration


def test_defaults_are_the_llm_d_ones() -> None:
    s = parse_args([])
    assert (s.grpc_port, s.grpc_health_port, s.metrics_port) == (9002, 9003, 9090)
    assert s.refresh_metrics_interval == pytest.approx(0.05)
    assert s.metrics_staleness_threshold == pytest.approx(2.0)
    assert s.secure_serving is True
    assert s.pool_namespace == "default"


def test_every_flag() -> None:
    s = parse_args(
        [
            "--grpc-port=1",
            "--grpc-health-port", "2",
            "--metrics-port", "3",
            "--config-file", "/etc/epp/config.yaml",
            "--pool-name", "pool",
            "--pool-namespace", "ns",
            "--refresh-metrics-interval", "100ms",
            "--metrics-staleness-threshold", "1m30s",
            "--secure-serving=false",
            "--v", "2",
        ]
    )  # fmt: skip
    assert (s.grpc_port, s.grpc_health_port, s.metrics_port) == (1, 2, 3)
    assert s.config_file == "/etc/epp/config.yaml"
    assert (s.pool_name, s.pool_namespace) == ("pool", "ns")
    assert s.refresh_metrics_interval == pytest.approx(0.1)
    assert s.metrics_staleness_threshold == pytest.approx(90.0)
    assert s.secure_serving is False
    assert s.v == 2


def test_go_style_single_dash_and_bare_bool() -> None:
    s = parse_args(["-pool-name=p", "-secure-serving", "-cert-path", "/certs", "-v=1"])
    assert s.pool_name == "p"
    assert s.secure_serving is True
    assert s.cert_path == "/certs"
    assert s.v == 1


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
    ("argv", "named"),
    [
        (["--grpc-port", "http"], "--grpc-port"),
        (["--grpc-port", "70000"], "--grpc-port"),
        (["--refresh-metrics-interval", "5"], "--refresh-metrics-interval"),
        (["--metrics-staleness-threshold", "-1s"], "--metrics-staleness-threshold"),
        (["--secure-serving=maybe"], "--secure-serving"),
        (["--config-file", "a", "--config-text", "b"], "mutually exclusive"),
        (["--grpc-port", "9003"], "must differ"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
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
