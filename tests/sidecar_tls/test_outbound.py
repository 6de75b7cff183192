"""Outbound TLS per stage: untrusted, trusted through --ca-file, skip-verify, mutual TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.settings import SettingsError, load_settings
from tests.sidecar.conftest import StartSidecar

from .certs import CA, server_context
from .conftest import StartFront

BODY = {"model": "sim-model", "prompt": "hello tls", "max_tokens": 3}


async def completion(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with client.post(url + "/v1/completions", json=BODY, headers=headers) as resp:
        return resp.status, await resp.json()


@pytest.fixture
def ca() -> CA:
    return CA()


async def test_untrusted_prefiller_is_a_502_naming_prefill_and_tls(
    tmp_path: Path,
    ca: CA,
    start_sim: Any,
    start_sidecar: StartSidecar,
    tls_front: StartFront,
    client: aiohttp.ClientSession,
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    front = await tls_front(prefill.url, server_context(ca.issue("prefill"), tmp_path / "p"))
    sidecar = await start_sidecar(model_server_port=decode.port, enable_tls=["prefiller"])
    status, body = await completion(client, sidecar.url, {"x-prefiller-host-port": front.host_port})
    assert status == 502, body
    error = body["error"]
    assert error["stage"] == "prefill"
    assert "TLS" in error["message"] and "certificate verify failed" in error["message"]
    assert sidecar.sample("pd_sidecar_prefill_failures_total", reason="tls") == 1
    assert (await prefill.stats())["requests_total"] == 0
    assert (await decode.stats())["requests_total"] == 0


async def test_prefiller_trusted_through_ca_file(
    tmp_path: Path,
    ca: CA,
    start_sim: Any,
    start_sidecar: StartSidecar,
    tls_front: StartFront,
    client: aiohttp.ClientSession,
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    front = await tls_front(prefill.url, server_context(ca.issue("prefill"), tmp_path / "p"))
    sidecar = await start_sidecar(
        model_server_port=decode.port,
        enable_tls=["prefiller"],
        ca_file=ca.write(tmp_path / "ca.pem"),
    )
    status, body = await completion(client, sidecar.url, {"x-prefiller-host-port": front.host_port})
    assert status == 200, body
    assert (await prefill.stats())["requests_by_role"]["prefill"] == 1
    decode_stats = await decode.stats()
    assert decode_stats["requests_by_role"]["decode"] == 1
    assert decode_stats["kv_pulls_ok"] == 1


async def test_skip_verify_accepts_any_certificate(
    tmp_path: Path,
    ca: CA,
    start_sim: Any,
    start_sidecar: StartSidecar,
    tls_front: StartFront,
    client: aiohttp.ClientSession,
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    front = await tls_front(prefill.url, server_context(ca.issue("prefill"), tmp_path / "p"))
    sidecar = await start_sidecar(
        model_server_port=decode.port,
        enable_tls=["prefiller"],
        tls_insecure_skip_verify=["prefiller"],
    )
    status, body = await completion(client, sidecar.url, {"x-prefiller-host-port": front.host_port})
    assert status == 200, body
    assert (await prefill.stats())["requests_by_role"]["prefill"] == 1


async def test_mutual_tls_required_by_the_prefiller(
    tmp_path: Path,
    ca: CA,
    start_sim: Any,
    start_sidecar: StartSidecar,
    tls_front: StartFront,
    client: aiohttp.ClientSession,
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    context = server_context(ca.issue("prefill"), tmp_path / "p", require_client_from=ca)
    front = await tls_front(prefill.url, context)
    ca_file = ca.write(tmp_path / "ca.pem")
    headers = {"x-prefiller-host-port": front.host_port}
    without = await start_sidecar(
        model_server_port=decode.port, enable_tls=["prefiller"], ca_file=ca_file
    )
    status, body = await completion(client, without.url, headers)
    assert status == 502, body
    assert body["error"]["stage"] == "prefill" and "TLS" in body["error"]["message"]
    # A client certificate from a CA the prefiller does not trust is refused too.
    stranger = CA("stranger").issue("sidecar", client=True).write(tmp_path / "s", "c.crt", "c.key")
    wrong = await start_sidecar(
        model_server_port=decode.port,
        enable_tls=["prefiller"],
        ca_file=ca_file,
        client_cert_file=str(stranger / "c.crt"),
        client_key_file=str(stranger / "c.key"),
    )
    status, body = await completion(client, wrong.url, headers)
    assert status == 502 and "TLS" in body["error"]["message"], body
    assert (await prefill.stats())["requests_total"] == 0
    mine = ca.issue("sidecar", client=True).write(tmp_path / "c", "c.crt", "c.key")
    with_cert = await start_sidecar(
        model_server_port=decode.port,
        enable_tls=["prefiller"],
        ca_file=ca_file,
        client_cert_file=str(mine / "c.crt"),
        client_key_file=str(mine / "c.key"),
    )
    status, body = await completion(client, with_cert.url, headers)
    assert status == 200, body
    assert (await prefill.stats())["requests_by_role"]["prefill"] == 1


async def test_decoder_over_tls(
    tmp_path: Path,
    ca: CA,
    start_sim: Any,
    start_sidecar: StartSidecar,
    tls_front: StartFront,
    client: aiohttp.ClientSession,
) -> None:
    decode = await start_sim(role="decode", zero_latency=True)
    front = await tls_front(decode.url, server_context(ca.issue("decode"), tmp_path / "d"))
    untrusted = await start_sidecar(model_server_port=front.port, enable_tls=["decoder"])
    status, body = await completion(client, untrusted.url, {})
    assert status == 502 and body["error"]["stage"] == "decode", body
    assert "TLS" in body["error"]["message"]
    async with client.get(untrusted.url + "/ready") as resp:
        assert resp.status == 503
    trusted = await start_sidecar(
        model_server_port=front.port, enable_tls=["decoder"], ca_file=ca.write(tmp_path / "ca")
    )
    status, body = await completion(client, trusted.url, {})
    assert status == 200, body
    async with client.get(trusted.url + "/ready") as resp:
        assert resp.status == 200
    assert (await decode.stats())["requests_by_role"]["aggregated"] == 1


def test_tls_flags_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="--enable-tls"):
        load_settings(["--enable-tls=prefiller,gateway"])
    with pytest.raises(SettingsError, match="go together"):
        load_settings(["--client-cert-file=/x"])
    settings = load_settings(
        ["--enable-tls=prefiller,decoder", "--tls-insecure-skip-verify=decoder"]
    )
    assert settings.model_server_url.startswith("https://")


async def test_unusable_ca_file_stops_start_up(tmp_path: Path, start_sidecar: StartSidecar) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ValueError, match="--ca-file"):
        await start_sidecar(enable_tls=["prefiller"], ca_file=str(bad))


async def test_encoder_over_tls(
    tmp_path: Path,
    ca: CA,
    start_sim: Any,
    start_sidecar: StartSidecar,
    tls_front: StartFront,
    client: aiohttp.ClientSession,
) -> None:
    encoder = await start_sim(zero_latency=True, role="encode", ec_connector="ec-nixl")
    decode = await start_sim(zero_latency=True, ec_connector="ec-nixl")
    front = await tls_front(encoder.url, server_context(ca.issue("encode"), tmp_path / "e"))
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/tls.png"}}
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}],
        "max_tokens": 2,
    }
    headers = {"x-encoder-hosts-ports": front.host_port}
    untrusted = await start_sidecar(
        model_server_port=decode.port, ec_connector="ec-nixl", enable_tls=["encoder"]
    )
    async with client.post(
        untrusted.url + "/v1/chat/completions", json=body, headers=headers
    ) as resp:
        answer = await resp.json()
    assert resp.status == 502, answer
    assert answer["error"]["stage"] == "encode" and "TLS" in answer["error"]["message"]
    assert (await encoder.stats())["encodes"] == 0
    trusted = await start_sidecar(
        model_server_port=decode.port,
        ec_connector="ec-nixl",
        enable_tls=["encoder"],
        ca_file=ca.write(tmp_path / "ca.pem"),
    )
    async with client.post(
        trusted.url + "/v1/chat/completions", json=body, headers=headers
    ) as resp:
        assert resp.status == 200, await resp.text()
    assert (await encoder.stats())["encodes"] == 1
    assert (await decode.stats())["ec_loads_ok"] == 1
