"""--secure-proxy: TLS on the main port, self-signed or from --cert-path, rotated live."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from tests.conftest import eventually
from tests.sidecar.conftest import StartSidecar

from .certs import CA, Issued


async def peer_certificate(port: int, context: ssl.SSLContext) -> bytes:
    """The certificate a brand-new connection to ``port`` is shown (DER)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        assert der is not None
        return bytes(der)
    finally:
        writer.close()
        await writer.wait_closed()


def rotate(directory: Path, issued: Issued) -> None:
    # As the kubelet does for a Secret volume: new files, then an atomic switch.
    staging = directory.parent / (directory.name + ".new")
    issued.write(staging)
    for name in ("tls.crt", "tls.key"):
        os.replace(staging / name, directory / name)


async def test_self_signed_certificate_names_the_pod_ip_and_localhost(
    start_sim: Any, start_sidecar: StartSidecar
) -> None:
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(
        model_server_port=decode.port, secure_proxy=True, pod_ip="10.1.2.3"
    )
    tls = sidecar.servers.tls
    assert tls is not None
    cert = x509.load_pem_x509_certificate(tls.certificate)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    }
    # A client that trusts exactly that certificate gets TLS, on localhost and 127.0.0.1.
    trust = ssl.create_default_context(cadata=tls.certificate.decode())
    url = f"https://localhost:{sidecar.servers.port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/ready", ssl=trust) as resp:
            assert resp.status == 200
        body = {"model": "sim-model", "prompt": "hi", "max_tokens": 2}
        async with session.post(
            f"https://127.0.0.1:{sidecar.servers.port}/v1/completions", json=body, ssl=trust
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"]
        # Plain HTTP on the TLS port is not served.
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{sidecar.servers.port}/health") as resp:
                await resp.read()


async def test_certificate_rotated_while_serving(
    tmp_path: Path, start_sim: Any, start_sidecar: StartSidecar
) -> None:
    ca = CA()
    first, second = ca.issue("first"), ca.issue("second")
    certs = first.write(tmp_path / "certs")
    # Slow tokens: the stream below is still running while the certificate changes.
    decode = await start_sim(role="decode", itl_ms=20.0, ttft_base_ms=1.0)
    sidecar = await start_sidecar(
        model_server_port=decode.port,
        secure_proxy=True,
        cert_path=str(certs),
        cert_reload_interval=0.02,
    )
    port = sidecar.servers.port
    trust = ca.client_context()
    assert await peer_certificate(port, trust) == first.der
    body = {"model": "sim-model", "prompt": "rotate", "max_tokens": 40, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"https://127.0.0.1:{port}/v1/completions", json=body, ssl=trust
        ) as resp:
            assert resp.status == 200
            ssl_object = resp.connection.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
            assert ssl_object.getpeercert(binary_form=True) == first.der
            first_chunk = await resp.content.readline()
            assert first_chunk.startswith(b"data: ")
            rotate(certs, second)

            async def rotated() -> bool:
                return await peer_certificate(port, trust) == second.der

            await eventually(rotated, what="new connections see the new certificate")
            # The stream that began before the rotation finishes on its connection.
            rest = await resp.content.read()
        events = [line for line in (first_chunk + rest).split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]"
        tokens = [json.loads(e[6:]) for e in events[:-1]]
        assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    assert sidecar.sample("pd_sidecar_tls_reloads_total", outcome="ok") == 1
    # A broken pair (key of another certificate) is ignored: the last good one stays.
    broken = Issued(first.cert_pem, second.key_pem)
    rotate(certs, broken)
    await eventually(
        lambda: _value(sidecar.sample("pd_sidecar_tls_reloads_total", outcome="error") == 1),
        what="broken pair refused",
    )
    assert await peer_certificate(port, trust) == second.der


async def _value(result: bool) -> bool:
    return result


async def test_missing_cert_path_stops_start_up(
    tmp_path: Path, start_sidecar: StartSidecar
) -> None:
    with pytest.raises(ValueError, match="--cert-path"):
        await start_sidecar(secure_proxy=True, cert_path=str(tmp_path / "nothing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tls.crt").write_text("x")
    (bad / "tls.key").write_text("y")
    with pytest.raises(ValueError, match="--cert-path"):
        await start_sidecar(secure_proxy=True, cert_path=str(bad))
