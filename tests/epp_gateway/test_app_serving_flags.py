"""Serving flags of the EPP process: certificate reload, cipher suites, TLS floor,
grpc.health.v1 on the ext_proc port, gRPC message limits, Go-only flags."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.tls import self_signed
from epp.app import EppApp, StartupError
from epp.settings import EppSettings
from examples.local_stack.processes import free_port
from tests.conftest import eventually
from tests.epp_gateway.backends import RecordingBackend
from tests.epp_gateway.fakes import ExtProcClient, request_body, request_headers
from tests.epp_gateway.pool import always_disagg_config, write_endpoints

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
async def endpoints(tmp_path: Path) -> AsyncIterator[Path]:
    decode = RecordingBackend("d")
    await decode.start()
    path = tmp_path / "endpoints.yaml"
    write_endpoints(path, [(decode, "decode")])
    yield path
    await decode.stop()


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


def _write_pair(directory: Path, common_name: str, mtime: float | None = None) -> bytes:
    pair = self_signed(common_name=common_name)
    (directory / "tls.crt").write_bytes(pair.cert_pem)
    (directory / "tls.key").write_bytes(pair.key_pem)
    if mtime is not None:
        for name in ("tls.crt", "tls.key"):
            os.utime(directory / name, (mtime, mtime))
    return pair.cert_pem


async def _check(port: int, trusted: bytes) -> bool:
    """A health check over TLS that trusts only ``trusted``; False if the handshake fails."""
    credentials = grpc.ssl_channel_credentials(root_certificates=trusted)
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            await stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=2)
        except grpc.aio.AioRpcError:
            return False
    return True


async def test_cert_reload_serves_new_certificates_to_new_connections(
    tmp_path: Path, endpoints: Path
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    first = _write_pair(certs, "first")
    app = EppApp(
        _settings(
            endpoints, secure_serving=True, cert_path=str(certs), enable_cert_reload=True,
            health_checking=True,
        )
    )  # fmt: skip
    await app.start()
    try:
        assert await _check(app.grpc_port, first)
        later = (certs / "tls.crt").stat().st_mtime + 10
        second = _write_pair(certs, "second", mtime=later)
        await eventually(lambda: _check(app.grpc_port, second), "the new certificate served")
        assert app.cert_reloader is not None and app.cert_reloader.reloads == 1
        assert not await _check(app.grpc_port, first)
    finally:
        await app.stop()


async def test_health_checking_answers_on_the_ext_proc_port(endpoints: Path) -> None:
    app = EppApp(_settings(endpoints, health_checking=True))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def ready() -> bool:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"))
                return bool(reply.status == SERVING)

            await eventually(ready, "readiness on the ext_proc port")
    finally:
        await app.stop()


async def test_grpc_max_recv_msg_size_bounds_ext_proc_messages(endpoints: Path) -> None:
    app = EppApp(_settings(endpoints, grpc_max_recv_msg_size=4096))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            client = ExtProcClient(channel)
            await client.send(request_headers("/v1/chat/completions"))
            await client.send(request_body(b"x" * 8192, end_of_stream=True))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.recv()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await app.stop()


async def test_tls13_floor_is_refused_and_go_only_flags_are_said_once(
    endpoints: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = EppApp(_settings(endpoints, secure_serving=True, tls_min_version="VersionTLS13"))
    with pytest.raises(StartupError, match="VersionTLS13") as info:
        await app.start()
    assert info.value.exit_code == 2
    caplog.set_level(logging.INFO, logger="epp")
    app = EppApp(_settings(endpoints, enable_pprof=True))
    await app.start()
    await app.stop()
    said = [r for r in caplog.records if "--enable-pprof has no effect" in r.getMessage()]
    assert len(said) == 1


def _handshake(port: int, cipher: str) -> bool:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(cipher)
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            return tls.cipher() is not None
    except (ssl.SSLError, ConnectionError):
        return False


async def test_cipher_suites_limit_tls12(endpoints: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp", "--config-text", always_disagg_config(endpoints),
        "--bind-address", "127.0.0.1", "--grpc-port", str(port), "--grpc-health-port", "0",
        "--metrics-port", "0", "--metrics-endpoint-auth=false", "--tracing=false",
        "--drain-timeout=0s", "--tls-cipher-suites", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:

        async def serving() -> None:
            while b"epp serving" not in await proc.stderr.readline():  # type: ignore[union-attr]
                assert proc.returncode is None

        await asyncio.wait_for(serving(), 30)
        assert await asyncio.to_thread(_handshake, port, "ECDHE-ECDSA-AES256-GCM-SHA384")
        assert not await asyncio.to_thread(_handshake, port, "ECDHE-ECDSA-AES128-GCM-SHA256")
    finally:
        proc.terminate()
        await proc.wait()
