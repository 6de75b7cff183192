"""llm-d's sidecar flags, defaults and environment variables; features not implemented
here are refused with "not supported yet" when turned on, accepted when off."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.app import SERVICES
from sidecar.settings import SettingsError, load_settings
from sidecar.ssrf import PoolSource
from tests.sidecar.conftest import StartSidecar
from tests.sidecar.test_process import SCRIPT, Process

# Every flag of llm-d's sidecar options at its default (off) value, spelled as its
# docs and chart spell them.
LLMD_DEFAULTS = [
    "--port=8000",
    "--model-server-port=8200",
    "--data-parallel-size=1",
    "--kv-connector=nixlv2",
    "--ec-connector=",
    "--mooncake-bootstrap-port=8998",
    "--p2p-connector-port=7777",
    "--enable-p2p-pull=false",
    "--enable-ssrf-protection=false",
    "--enable-prefiller-sampling=false",
    "--enable-tls=",
    "--tls-insecure-skip-verify=",
    "--secure-proxy=true",
    "--cert-path=",
    "--inference-pool=",
    "--pool-group=inference.networking.k8s.io",
    "--max-idle-conns-per-host=100",
    "--prefill-max-retries=0",
    "--prefill-retry-backoff=200ms",
    "--decode-chunk-size=0",
    "--tracing=false",
    "--metrics-port=0",
    "--moriio-write-mode=false",
    "--moriio-decode-notify-port=61005",
    "--moriio-local-pod-ip=10.0.0.5",
    "--moriio-decode-handshake-port=6301",
    "--moriio-parallel-dispatch=false",
    "--moriio-parallel-decode-wait-timeout=30s",
    "--moriio-prefill-handshake-port=6301",
    "--moriio-prefill-notify-port=61005",
    "--moriio-tp-size=1",
    "--moriio-dp-size=1",
    "--moriio-remote-hosts=",
    "--moriio-dp-size-local=0",
    "--moriio-decode-hosts=",
    "--zap-log-level=info",
    "--zap-devel=false",
    "--zap-encoder=json",
    "--zap-stacktrace-level=error",
    "--zap-time-encoding=rfc3339",
]


def test_llmd_defaults() -> None:
    settings = load_settings([], env={})
    assert settings.secure_proxy is True  # HTTPS, self-signed when no --cert-path
    assert settings.cert_path == ""
    assert settings.prefill_max_retries == 0
    assert settings.prefill_retry_backoff == pytest.approx(0.2)
    assert settings.max_idle_conns_per_host == 1024
    assert settings.pool_group == "inference.networking.k8s.io"
    assert settings.p2p_connector_port == 7777
    assert settings.mooncake_bootstrap_port == settings.sglang_bootstrap_port == 8998
    assert settings.decode_chunk_size == 0 and settings.tracing is False
    assert settings.enable_p2p_pull is False and settings.moriio_write_mode is False


def test_every_llmd_flag_is_accepted_at_its_off_value() -> None:
    settings = load_settings(LLMD_DEFAULTS, env={})
    assert settings.max_idle_conns_per_host == 100
    assert settings.prefill_retry_backoff == pytest.approx(0.2)
    # The deprecated spelling of --model-server-port too.
    assert load_settings(["--vllm-port=8300"], env={}).model_server_port == 8300


def test_decode_chunk_size_is_accepted() -> None:
    assert load_settings(["--decode-chunk-size=256"], env={}).decode_chunk_size == 256


def test_offloading_and_p2p_pull_are_accepted() -> None:
    offloading = load_settings(["--kv-connector=offloading"], env={"P2P_CONNECTOR_PORT": "7800"})
    assert offloading.p2p_connector_port == 7800 and offloading.p2p_pull_available
    pull = load_settings(["--enable-p2p-pull"], env={})
    assert pull.kv_connector == "nixlv2" and pull.p2p_pull_available
    assert not load_settings([], env={}).p2p_pull_available


@pytest.mark.parametrize(
    "argv",
    [
        ["--kv-connector=offloading"],
        ["--enable-p2p-pull"],
        ["--decode-chunk-size=256"],
        ["--tracing"],
        ["--moriio-write-mode", "--moriio-local-pod-ip=10.0.0.3"],
        ["--moriio-dp-size=8", "--moriio-dp-size-local=8"],
    ],
)
def test_every_llmd_feature_can_be_turned_on(argv: list[str]) -> None:
    load_settings(argv, env={})


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--enable-p2p-pull", "--kv-connector=sglang"], "requires --kv-connector=nixlv2"),
        (["--p2p-connector-port=65535", "--data-parallel-size=2"], "--p2p-connector-port"),
        (["--p2p-connector-port=0"], "--p2p-connector-port"),
        (["--pool-group=example.com"], "--pool-group"),
        (["--max-idle-conns-per-host=-1"], "--max-idle-conns-per-host"),
        (["--decode-chunk-size=-1"], "--decode-chunk-size"),
        (["--zap-log-level=loud"], "--zap-log-level"),
        (["--zap-encoder=console"], "--zap-encoder"),
    ],
)
def test_invalid_llmd_values_name_the_flag(argv: list[str], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        load_settings(argv, env={})


def test_the_process_exits_2_naming_an_inconsistent_flag() -> None:
    done = subprocess.run(
        [SCRIPT, "--enable-p2p-pull", "--kv-connector=sglang"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--enable-p2p-pull requires --kv-connector=nixlv2" in done.stderr


def test_llmd_environment_variables() -> None:
    env = {
        "INFERENCE_POOL": "llm/pool",
        "ENABLE_PREFILLER_SAMPLING": "true",
        "SGLANG_BOOTSTRAP_PORT": "9100",
        "MOONCAKE_BOOTSTRAP_PORT": "9200",
        "P2P_CONNECTOR_PORT": "9300",
    }
    settings = load_settings([], env=env)
    assert settings.pool_ref == ("llm", "pool")
    assert settings.enable_prefiller_sampling is True
    assert settings.sglang_bootstrap_port == 9100
    assert settings.mooncake_bootstrap_port == 9200
    assert settings.p2p_connector_port == 9300
    # A name alone means the default namespace, as in llm-d.
    assert load_settings([], env={"INFERENCE_POOL": "pool"}).pool_ref == ("default", "pool")
    # YAML, then flags, override the environment.
    settings = load_settings(
        ["--configuration", "sglang-bootstrap-port: 9101", "--mooncake-bootstrap-port=9201"],
        env=env,
    )
    assert (settings.sglang_bootstrap_port, settings.mooncake_bootstrap_port) == (9101, 9201)
    flagged = load_settings(["--enable-prefiller-sampling=false"], env=env)
    assert flagged.enable_prefiller_sampling is False


def test_unusable_environment_values_are_ignored_as_llm_d_does() -> None:
    env = {
        "ENABLE_PREFILLER_SAMPLING": "yes",
        "SGLANG_BOOTSTRAP_PORT": "port",
        "MOONCAKE_BOOTSTRAP_PORT": "",
        "P2P_CONNECTOR_PORT": "7.5",
    }
    settings = load_settings([], env=env)
    assert settings.enable_prefiller_sampling is False
    assert settings.sglang_bootstrap_port == settings.mooncake_bootstrap_port == 8998
    assert settings.p2p_connector_port == 7777


async def test_max_idle_conns_per_host_is_the_upstream_per_host_limit(
    start_sim: Any, start_sidecar: StartSidecar
) -> None:
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port, max_idle_conns_per_host=7)
    services = sidecar.servers.app[SERVICES]
    for upstream in (services.local, services.orchestrator.prefill):
        connector = upstream.session.connector
        assert connector is not None and connector.limit_per_host == 7
    default = await start_sidecar(model_server_port=decode.port, max_idle_conns_per_host=0)
    connector = default.servers.app[SERVICES].local.session.connector
    assert connector is not None and connector.limit_per_host == 1024


def test_pool_group_reaches_the_pool_watch() -> None:
    settings = load_settings(["--pool-group=inference.networking.x-k8s.io"], env={})
    source = PoolSource(namespace="ns", name="pool", pool_group=settings.pool_group)
    assert source._watcher.pool_group == "inference.networking.x-k8s.io"
    assert source._watcher.pool_version == "v1alpha2"


async def test_llmd_flag_set_and_environment_serve_pd_over_https(
    start_sim: Any, tmp_path: Path
) -> None:
    """pd-sidecar started as llm-d's chart and docs start it (every flag, the four
    environment variables, a YAML configuration file), HTTPS by default."""
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    config = tmp_path / "sidecar.yaml"
    config.write_text("prefill-max-retries: 1\nprefill-retry-backoff: 50ms\n")
    overrides = {
        "--port": "--port=0",
        "--model-server-port": f"--model-server-port={decode.port}",
        "--secure-proxy": None,  # the default: HTTPS with a self-signed certificate
        "--prefill-max-retries": None,  # from the configuration file
        "--prefill-retry-backoff": None,
    }
    argv = []
    for flag in LLMD_DEFAULTS:
        name = flag.split("=", 1)[0]
        if name in overrides:
            if overrides[name] is not None:
                argv.append(overrides[name])
        else:
            argv.append(flag)
    argv += [f"--configuration-file={config}", "--listen-host=127.0.0.1"]
    env = {
        **os.environ,
        "INFERENCE_POOL": "llm/disagg-pool",
        "ENABLE_PREFILLER_SAMPLING": "true",
        "SGLANG_BOOTSTRAP_PORT": "8998",
        "MOONCAKE_BOOTSTRAP_PORT": "8998",
        "P2P_CONNECTOR_PORT": "7777",
        "POD_IP": "127.0.0.1",
    }
    proc = await asyncio.create_subprocess_exec(
        SCRIPT, *argv, env=env, stderr=asyncio.subprocess.PIPE
    )
    sidecar = Process(proc)
    try:
        listening = await asyncio.wait_for(sidecar.listening, 60)
        assert listening["tls"] is True
        url = f"https://127.0.0.1:{listening['port']}"
        body = {"model": "sim-model", "prompt": "over https", "max_tokens": 3}
        headers = {"x-prefiller-host-port": prefill.host_port}
        connector = aiohttp.TCPConnector(ssl=False)  # the certificate is self-signed
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["choices"][0]["text"]
            stream = {**body, "stream": True}
            async with session.post(url + "/v1/completions", json=stream, headers=headers) as resp:
                assert resp.status == 200
                assert (await resp.read()).rstrip().endswith(b"data: [DONE]")
        # Plain HTTP is not served on that port.
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{listening['port']}/health") as r:
                    await r.read()
        assert (await decode.stats())["kv_pulls_ok"] == 2
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await sidecar.reader
