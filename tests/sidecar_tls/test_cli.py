"""The console script: unusable TLS/SSRF material stops start-up with status 2, named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BASE = ["--port=0", "--metrics-port=0", "--listen-host=127.0.0.1", "--secure-proxy=false"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--secure-proxy", "--cert-path={tmp}/missing"], "--cert-path"),
        (["--enable-tls=prefiller", "--ca-file={tmp}/junk.pem"], "--ca-file"),
        (["--enable-ssrf-protection", "--ssrf-allowlist-file={tmp}/junk.pem"], "junk.pem"),
        (["--enable-ssrf-protection"], "--inference-pool"),
        (["--data-parallel-size=2", "--port=8000", "--model-server-port=8001"], "overlap"),
    ],
)
def test_start_up_failures_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "junk.pem").write_text("allow: [{host: x}]\n")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", *BASE, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr
    assert "Traceback" not in done.stderr
