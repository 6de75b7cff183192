"""The whole EPP process: settings -> director -> ext_proc, health and metrics servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.tls import self_signed
from epp.app import EXTPROC_SERVICE, EppApp
from epp.director import Director
from epp.settings import EppSettings
from examples.local_stack.processes import free_port
from tests.epp_gateway.backends import RecordingBackend
from tests.epp_gateway.fakes import ExtProcClient, request_body, request_headers
from tests.epp_gateway.pool import always_disagg_config, write_endpoints

if TYPE_CHECKING:
    from pathlib import Path

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()


def _settings(endpoints: Path, **overrides: object) -> EppSettings:
    values: dict[str, object] = {
        "grpc_port": 0,
        "grpc_health_port": 0,
        "metrics_port": 0,
        "bind_address": "127.0.0.1",
        "config_text": always_disagg_config(endpoints),
        "secure_serving": False,
        "shutdown_grace": 1.0,
        "metrics_endpoint_auth": False,
        "tracing": False,
        **overrides,
    }
    return EppSettings.model_validate(values)


@pytest.fixture
async def pods() -> AsyncIterator[tuple[RecordingBackend, RecordingBackend]]:
    decode, prefill = RecordingBackend("d"), RecordingBackend("p")
    await decode.start()
    await prefill.start()
    yield decode, prefill
    await decode.stop()
    await prefill.stop()


async def _health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


async def _wait_health(port: int, service: str, status: int) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while (now := await _health(port, service)) != status:
        assert asyncio.get_running_loop().time() < deadline, f"{service!r} stayed {now}"
        await asyncio.sleep(0.02)


async def test_app_serves_decisions_health_and_metrics(
    tmp_path: Path, pods: tuple[RecordingBackend, RecordingBackend]
) -> None:
    decode, prefill = pods
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [])
    app = EppApp(_settings(endpoints))
    await app.start()
    try:
        # live at once, ready only once endpoints are known
        assert await _health(app.health_port, "") == SERVING
        assert await _health(app.health_port, "liveness") == SERVING
        assert await _health(app.health_port, "readiness") == NOT_SERVING
        assert await _health(app.health_port, EXTPROC_SERVICE) == NOT_SERVING

        write_endpoints(endpoints, [(decode, "decode"), (prefill, "prefill")])
        await _wait_health(app.health_port, "readiness", SERVING)
        assert await _health(app.health_port, EXTPROC_SERVICE) == SERVING

        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            client = ExtProcClient(channel)
            await client.send(
                request_headers("/v1/chat/completions"), request_body(CHAT, end_of_stream=True)
            )
            first = await client.recv()
            await client.recv()
            await client.close()
            await client.expect_end()
        headers = {
            o.header.key: o.header.raw_value.decode()
            for o in first.request_headers.response.header_mutation.set_headers
        }
        assert headers == {
            "x-gateway-destination-endpoint": decode.host_port,
            "x-prefiller-host-port": prefill.host_port,
            "content-length": str(len(CHAT)),
        }

        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{app.metrics_port}/metrics") as r,
        ):
            assert r.status == 200
            text = await r.text()
        assert (
            'llm_d_epp_disagg_decision_total{decision_type="prefill-decode",model_name="m",'
            'plugin_name="disagg-profile-handler",plugin_type="disagg-profile-handler"} 1.0'
        ) in text
        assert 'disagg_epp_endpoints{role="decode"} 1.0' in text
        assert 'disagg_epp_endpoints{role="prefill"} 1.0' in text
        [tasks] = [line for line in text.splitlines() if line.startswith("python_asyncio_tasks ")]
        assert float(tasks.split()[1]) >= 1  # at least the serving loop's own tasks

        write_endpoints(endpoints, [])
        await _wait_health(app.health_port, "readiness", NOT_SERVING)
    finally:
        await app.stop()
    # stopped: nothing listens any more
    with pytest.raises(grpc.aio.AioRpcError):
        await _health(app.health_port, "")


async def test_extproc_port_opens_only_once_endpoints_are_loaded(
    tmp_path: Path,
    pods: tuple[RecordingBackend, RecordingBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Envoy reconnects to a restarted EPP as soon as its port accepts: a request then must
    # be routed, not refused for lack of endpoints (found by tests/faults).
    decode, prefill = pods
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [(decode, "decode"), (prefill, "prefill")])
    port = free_port()
    entered, release = asyncio.Event(), asyncio.Event()
    original = Director.start

    async def held_start(self: Director) -> None:
        entered.set()
        await release.wait()
        await original(self)

    monkeypatch.setattr(Director, "start", held_start)
    app = EppApp(_settings(endpoints, grpc_port=port))
    starting = asyncio.create_task(app.start())
    try:
        await asyncio.wait_for(entered.wait(), 10)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        release.set()
        await asyncio.wait_for(starting, 10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = ExtProcClient(channel)
            await client.send(
                request_headers("/v1/chat/completions"), request_body(CHAT, end_of_stream=True)
            )
            first = await client.recv()
            assert first.request_headers.response.header_mutation.set_headers
            await client.recv()
            await client.close()
            await client.expect_end()
    finally:
        release.set()
        await asyncio.gather(starting, return_exceptions=True)
        await app.stop()


async def test_app_serves_tls_from_a_cert_dir(
    tmp_path: Path, pods: tuple[RecordingBackend, RecordingBackend]
) -> None:
    decode, _ = pods
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [(decode, "decode")])
    pair = self_signed()
    (tmp_path / "tls.crt").write_bytes(pair.cert_pem)
    (tmp_path / "tls.key").write_bytes(pair.key_pem)
    app = EppApp(_settings(endpoints, secure_serving=True, cert_path=str(tmp_path)))
    await app.start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=pair.cert_pem)
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{app.grpc_port}",
            credentials,
            options=[("grpc.ssl_target_name_override", "localhost")],
        ) as channel:
            client = ExtProcClient(channel)
            await client.send(
                request_headers("/v1/chat/completions"), request_body(CHAT, end_of_stream=True)
            )
            first = await client.recv()
            await client.close()
        assert first.request_headers.response.clear_route_cache
    finally:
        await app.stop()


async def test_bad_config_is_a_startup_error(tmp_path: Path) -> None:
    from epp.app import StartupError

    app = EppApp(_settings(tmp_path / "x.yaml", config_text="kind: Nope\n"))
    with pytest.raises(StartupError) as info:
        await app.start()
    assert info.value.exit_code == 2


async def test_missing_cert_dir_is_a_startup_error(tmp_path: Path) -> None:
    from epp.app import StartupError

    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [])
    app = EppApp(_settings(endpoints, secure_serving=True, cert_path=str(tmp_path / "none")))
    with pytest.raises(StartupError, match=r"tls\.crt"):
        await app.start()


async def _run_epp(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        cwd=os.getcwd(),
    )  # fmt: skip


async def test_console_script_exits_2_on_bad_flags_and_config(tmp_path: Path) -> None:
    proc = await _run_epp("--grpc-port", "x")
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"--grpc-port" in err

    proc = await _run_epp("--config-text", "kind: Nope", "--secure-serving=false")
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"configuration" in err


async def test_sigterm_drains_then_exits(
    tmp_path: Path, pods: tuple[RecordingBackend, RecordingBackend]
) -> None:
    # SIGTERM: not ready at once (liveness stays SERVING), ext_proc keeps serving for
    # --drain-timeout, then the process exits 0.
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [(pods[0], "decode")])
    config = tmp_path / "config.yaml"
    config.write_text(always_disagg_config(endpoints))
    grpc_port, health_port = free_port(), free_port()
    proc = await _run_epp(
        "--config-file", str(config), "--bind-address", "127.0.0.1",
        "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
        "--metrics-port", "0", "--shutdown-grace", "1s", "--drain-timeout", "3s",
        "--secure-serving=false", "--metrics-endpoint-auth=false", "--tracing=false",
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[bytes] = []

    async def serving() -> None:
        while b"epp serving" not in (line := await proc.stderr.readline()):  # type: ignore[union-attr]
            assert line, b"".join(lines).decode()
            lines.append(line)

    try:
        await asyncio.wait_for(serving(), 30)
        await _wait_health(health_port, "readiness", SERVING)
        proc.send_signal(signal.SIGTERM)
        await _wait_health(health_port, "readiness", NOT_SERVING)
        assert await _health(health_port, "inference-extension") == NOT_SERVING
        assert await _health(health_port, "liveness") == SERVING
        # Still routing while draining.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            client = ExtProcClient(channel)
            await client.send(
                request_headers("/v1/chat/completions"), request_body(CHAT, end_of_stream=True)
            )
            first = await client.recv()
            assert first.request_headers.response.header_mutation.set_headers
            await client.close()
        assert proc.returncode is None, "exited before the drain window was over"
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert b"draining for 3.0s" in rest
        assert b"drain window over" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
