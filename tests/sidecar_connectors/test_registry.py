"""Connector names: every built-in one starts, an unknown one stops start-up (exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sidecar.connectors import available_connectors
from sidecar.settings import SettingsError, load_settings


def test_builtin_connectors() -> None:
    assert available_connectors() == {
        "nixlv2",
        "shared-storage",
        "sglang",
        "mooncake",
        "moriio",
        "offloading",
    }
    for name in available_connectors():
        assert load_settings([f"--kv-connector={name}"]).kv_connector == name
    for name in ("ec-example", "ec-nixl", ""):
        assert load_settings([f"--ec-connector={name}"]).ec_connector == name


@pytest.mark.parametrize("flag", ["--kv-connector=lmcache", "--ec-connector=ec-shm"])
def test_unknown_connector_is_a_settings_error(flag: str) -> None:
    with pytest.raises(SettingsError, match="unknown"):
        load_settings([flag])


def test_unknown_connector_stops_start_up_with_status_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "--kv-connector=nixl-v3", "--port=0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--kv-connector" in proc.stderr and "nixl-v3" in proc.stderr
