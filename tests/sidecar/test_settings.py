"""Settings: llm-d flags, Go booleans and durations, YAML, environment, strict errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.settings import Settings, SettingsError, load_settings, parse_go_duration


def test_defaults() -> None:
    settings = load_settings([])
    assert settings.port == 8000
    assert settings.model_server_port == 8200
    assert settings.kv_connector == "nixlv2"
    assert settings.prefill_fallback == "error"
    assert 0 < settings.pool_keepalive_timeout < 5


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("200ms", 0.2), ("1m30s", 90.0), ("1.5h", 5400.0), ("300us", 0.0003), ("0", 0.0), (2, 2.0)],
)
def test_go_durations(text: str | int, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["200", "1x", "ms", "1m30", "-1s", "true"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_go_duration(text)


def test_flag_forms() -> None:
    settings = load_settings(
        [
            "--port=9000",
            "-model-server-port",
            "9001",
            "--enable-prefiller-sampling",
            "--prefill-retry-backoff=250ms",
            "--prefill-max-retries",
            "5",
            "--secure-proxy=false",
            "--stream-idle-timeout=1m30s",
        ]
    )
    assert settings.port == 9000
    assert settings.model_server_port == 9001
    assert settings.enable_prefiller_sampling is True
    assert settings.prefill_retry_backoff == pytest.approx(0.25)
    assert settings.prefill_max_retries == 5
    assert settings.secure_proxy is False
    assert settings.stream_idle_timeout == 90.0


@pytest.mark.parametrize("value", ["0", "f", "F", "FALSE", "false", "False"])
def test_go_false_spellings(value: str) -> None:
    assert (
        load_settings([f"--enable-prefiller-sampling={value}"]).enable_prefiller_sampling is False
    )


def test_klog_verbosity_is_accepted() -> None:
    assert load_settings(["-v=5"]).effective_log_level == "debug"
    assert load_settings(["--v", "2"]).effective_log_level == "info"


def test_deprecated_vllm_port_alias() -> None:
    assert load_settings(["--vllm-port=8300"]).model_server_port == 8300
    assert load_settings(["--connector=nixlv2"]).kv_connector == "nixlv2"


def test_yaml_file_inline_and_flags_merge(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("port: 7000\nprefill-max-retries: 1\nprefill-retry-backoff: 1s\n")
    settings = load_settings(
        [
            f"--configuration-file={path}",
            "--configuration",
            "prefill-max-retries: 2\nenable-prefiller-sampling: true",
            "--port=7001",
        ]
    )
    assert settings.port == 7001  # explicit flag wins
    assert settings.prefill_max_retries == 2  # inline YAML over the file
    assert settings.prefill_retry_backoff == 1.0  # from the file
    assert settings.enable_prefiller_sampling is True


def test_environment_fills_gaps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFERENCE_POOL_NAMESPACE", "ns-from-env")
    monkeypatch.setenv("PD_SIDECAR_PREFILL_MAX_RETRIES", "7")
    monkeypatch.setenv("PD_SIDECAR_PORT", "7100")
    settings = load_settings(["--port=7200"])
    assert settings.inference_pool_namespace == "ns-from-env"
    assert settings.prefill_max_retries == 7
    assert settings.port == 7200


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--no-such-flag=1"], "--no-such-flag"),
        (["--port=http"], "--port"),
        (["--port=70000"], "--port"),
        (["--secure-proxy=maybe"], "--secure-proxy"),
        (["--prefill-retry-backoff=5"], "--prefill-retry-backoff"),
        (["--kv-connector=teleport"], "--kv-connector"),
        (["--prefill-fallback=sometimes"], "--prefill-fallback"),
        (["--configuration", "porrt: 1"], "porrt"),
        (["--configuration", "- a list"], "--configuration"),
        (["--model-server-port"], "--model-server-port"),
        (["positional"], "positional"),
        (["--pool-keepalive-timeout=6s"], "--pool-keepalive-timeout"),
    ],
)
def test_invalid_configuration_names_the_field(argv: list[str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(argv)


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 1  # type: ignore[misc]
