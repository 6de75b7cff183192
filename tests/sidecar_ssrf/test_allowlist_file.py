"""SSRF protection from a static allowlist file: shape, rules, reload on change."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.routing import HostPort
from sidecar.settings import SettingsError, load_settings
from sidecar.ssrf import decide, parse_allowlist
from tests.conftest import eventually
from tests.sidecar.conftest import StartSidecar

BODY = {"model": "sim-model", "prompt": "hello", "max_tokens": 2}


def write(path: Path, doc: Any) -> None:
    # Write then rename, as a ConfigMap update does: the reader never sees half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    os.replace(tmp, path)


def test_shape_and_rules() -> None:
    members = parse_allowlist(
        """
allow:
  - host: 10.0.0.7
    ports: [8000, 8001]
    roles: [prefill]
  - host: "[fd00::1]"
    ports: [8000]
    roles: [encode]
  - host: Encoder-0.Encoders.svc.
    ports: [9000]
    roles: [encode-prefill]
""",
        "test",
    )

    def rule(host: str, port: int, stage: Any) -> str:
        return decide(members, HostPort(host, port), stage, "test").rule

    assert rule("10.0.0.7", 8001, "prefill") == "allowed"
    assert rule("10.0.0.8", 8000, "prefill") == "not-in-pool"
    assert rule("10.0.0.7", 8002, "prefill") == "port-not-target-port"
    assert rule("10.0.0.7", 8000, "encode") == "role-not-encode"
    assert rule("fd00:0::1", 8000, "encode") == "allowed"
    assert rule("fd00::1", 8000, "prefill") == "role-not-prefill"
    assert rule("encoder-0.encoders.svc", 9000, "encode") == "allowed"
    assert rule("encoder-0.encoders.svc", 9000, "prefill") == "allowed"
    assert rule("10.0.0.7", 8000, "kv-source") == "allowed"
    assert rule("10.0.0.7", 1, "kv-source") == "port-not-target-port"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("allow: [{host: 10.0.0.1, ports: []}]", "allow.0.ports"),
        ("allow: [{host: 10.0.0.1, ports: [70000]}]", "allow.0.ports.0"),
        ("allow: [{host: 10.0.0.1, port: 8000}]", "allow.0.port"),
        ("hosts: []", "hosts"),
        ("allow: [", "not valid YAML"),
    ],
)
def test_invalid_files_name_the_field(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        parse_allowlist(text, "allow.yaml")


def test_settings_need_a_source(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="--inference-pool"):
        load_settings(["--enable-ssrf-protection"])
    with pytest.raises(SettingsError, match="not both"):
        load_settings(
            ["--enable-ssrf-protection", "--inference-pool=p", f"--ssrf-allowlist-file={tmp_path}"]
        )
    with pytest.raises(SettingsError, match="--inference-pool"):
        load_settings(["--inference-pool=a/b/c"])
    settings = load_settings(["--enable-ssrf-protection", "--inference-pool=ns/pool"])
    assert settings.pool_ref == ("ns", "pool")


def test_pool_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_POOL_NAMESPACE", "llm")
    monkeypatch.setenv("INFERENCE_POOL_NAME", "pool-a")
    settings = load_settings(["--enable-ssrf-protection"])
    assert settings.pool_ref == ("llm", "pool-a")


async def test_file_allows_denies_and_reloads(
    tmp_path: Path, start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    path = tmp_path / "allow.json"
    write(path, {"allow": [{"host": "127.0.0.1", "ports": [prefill.port], "roles": ["prefill"]}]})
    sidecar = await start_sidecar(
        model_server_port=decode.port,
        enable_ssrf_protection=True,
        ssrf_allowlist_file=str(path),
        ssrf_reload_interval=0.02,
    )
    headers = {"x-prefiller-host-port": prefill.host_port}

    async def answer() -> tuple[int, str | None]:
        async with client.post(sidecar.url + "/v1/completions", json=BODY, headers=headers) as r:
            body = await r.json()
            return r.status, (body.get("error") or {}).get("rule")

    assert await answer() == (200, None)
    # The file changes: the port is no longer allowed.
    write(path, {"allow": [{"host": "127.0.0.1", "ports": [1], "roles": ["prefill"]}]})

    async def refused(rule: str) -> bool:
        return await answer() == (403, rule)

    await eventually(lambda: refused("port-not-target-port"), what="reload seen")
    # A broken file keeps the previous allowlist.
    write(path, "allow: [")
    write(path, "allow: [ {host: 127.0.0.1")
    assert await answer() == (403, "port-not-target-port")
    write(path, {"allow": [{"host": "127.0.0.1", "ports": [prefill.port], "roles": ["decode"]}]})
    await eventually(lambda: refused("role-not-prefill"), what="role change seen")
    write(path, {"allow": []})
    await eventually(lambda: refused("not-in-pool"), what="empty allowlist seen")


async def test_unusable_file_stops_start_up(tmp_path: Path, start_sidecar: StartSidecar) -> None:
    bad = tmp_path / "allow.yaml"
    bad.write_text("allow: [{host: x}]")
    with pytest.raises(ValueError, match=r"allow\.0\.ports"):
        await start_sidecar(enable_ssrf_protection=True, ssrf_allowlist_file=str(bad))
    with pytest.raises(ValueError, match="No such file"):
        await start_sidecar(
            enable_ssrf_protection=True, ssrf_allowlist_file=str(tmp_path / "missing.yaml")
        )
