"""``x-kv-cache-source-host-port``: a cached-prefix pull over the P2P tier (simulated engines).

The header becomes ``kv_transfer_params.remote_kv_source`` on the leg that computes the
prompt (the prefill leg under P/D, the local request without a prefiller), only when the
engines have the tier (offloading, nixlv2 with --enable-p2p-pull). It is a target like
any other: checked, refused with 400/403 when unusable or not allowed, and never
forwarded to an engine as a header.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.sidecar.conftest import StartSidecar

PROMPT = "a long shared system prompt that a peer already holds " * 8
HEADER = "x-kv-cache-source-host-port"


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "sim-model", "prompt": PROMPT, "max_tokens": 3, **extra}


async def _warm(client: aiohttp.ClientSession, sim: Any) -> None:
    """Let ``sim`` compute (and cache) the prompt."""
    async with client.post(sim.url + "/v1/completions", json=_body()) as r:
        assert r.status == 200


class RecordingServer:
    """A TCP listener that counts connections and answers any HTTP request with an
    empty P2P lookup, so a pull that reaches it shows up."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> RecordingServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            await reader.readexactly(length)
            self.requests.append(head.split(b"\r\n", 1)[0])
            answer = b'{"blocks": 0}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(answer), answer)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def recording_server() -> Any:
    server = await RecordingServer().start()
    try:
        yield server
    finally:
        await server.stop()


async def test_decode_only_request_pulls_the_prefix_from_the_source(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    source = await start_sim(zero_latency=True)
    d = await start_sim(zero_latency=True)
    await _warm(client, source)
    sidecar = await start_sidecar(
        model_server_port=d.port,
        kv_connector="offloading",
        p2p_connector_port=source.engine.side_channel_port,
    )
    headers = {HEADER: source.host_port}
    async with client.post(sidecar.url + "/v1/completions", json=_body(), headers=headers) as r:
        assert r.status == 200
        usage = (await r.json())["usage"]
    [rec] = (await d.stats())["recorded"]
    params = rec["body"]["kv_transfer_params"]
    assert list(params) == ["remote_kv_source"]
    pull = params["remote_kv_source"]
    assert pull["kv_request_id"]
    assert (pull["remote_host"], pull["remote_port"]) == (
        "127.0.0.1",
        source.engine.side_channel_port,
    )
    assert HEADER not in {name.lower() for name in rec["headers"]}
    d_stats, s_stats = await d.stats(), await source.stats()
    assert d_stats["p2p_source_pulls"] == 1 and d_stats["p2p_blocks_pulled"] > 0
    assert s_stats["p2p_blocks_served"] == d_stats["p2p_blocks_pulled"]
    # The pulled tokens were not computed: the engine counts them as an external transfer.
    pulled = d_stats["p2p_blocks_pulled"] * d.engine.config.block_size
    assert d.engine.tokens_by_source["external_kv_transfer"] == pulled
    assert d.engine.tokens_by_source["local_compute"] == usage["prompt_tokens"] - pulled


async def test_a_source_naming_this_endpoint_is_not_pulled_from(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port, kv_connector="offloading")
    headers = {HEADER: f"127.0.0.1:{sidecar.servers.port}"}
    async with client.post(sidecar.url + "/v1/completions", json=_body(), headers=headers) as r:
        assert r.status == 200
    [rec] = (await d.stats())["recorded"]
    assert "kv_transfer_params" not in rec["body"]


async def test_nixlv2_with_p2p_pull_puts_the_source_on_the_prefill_leg(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    source = await start_sim(zero_latency=True)
    p = await start_sim(role="prefill", zero_latency=True)
    d = await start_sim(role="decode", zero_latency=True)
    await _warm(client, source)
    sidecar = await start_sidecar(
        model_server_port=d.port,
        enable_p2p_pull=True,
        p2p_connector_port=source.engine.side_channel_port,
    )
    headers = {"x-prefiller-host-port": p.host_port, HEADER: source.host_port}
    async with client.post(sidecar.url + "/v1/completions", json=_body(), headers=headers) as r:
        assert r.status == 200
    p_stats, d_stats = await p.stats(), await d.stats()
    [p_rec], [d_rec] = p_stats["recorded"], d_stats["recorded"]
    p_params = p_rec["body"]["kv_transfer_params"]
    assert p_params["do_remote_decode"] is True  # the NIXL fields stay
    assert p_params["remote_kv_source"]["remote_port"] == source.engine.side_channel_port
    assert "remote_kv_source" not in d_rec["body"]["kv_transfer_params"]
    # The prefill engine pulled the prefix, the decode engine the prefill's KV.
    assert p_stats["p2p_blocks_pulled"] > 0 and d_stats["kv_pulls_ok"] == 1
    for rec in (p_rec, d_rec):
        assert HEADER not in {name.lower() for name in rec["headers"]}


@pytest.mark.parametrize("value", ["127.0.0.1:9", "not a target %%"])
async def test_without_p2p_pull_the_header_is_ignored(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, value: str
) -> None:
    p = await start_sim(role="prefill", zero_latency=True)
    d = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port)  # nixlv2, no --enable-p2p-pull
    headers = {"x-prefiller-host-port": p.host_port, HEADER: value}
    async with client.post(sidecar.url + "/v1/completions", json=_body(), headers=headers) as r:
        assert r.status == 200
    [p_rec], [d_rec] = (await p.stats())["recorded"], (await d.stats())["recorded"]
    assert "remote_kv_source" not in p_rec["body"]["kv_transfer_params"]
    for rec in (p_rec, d_rec):
        assert HEADER not in {name.lower() for name in rec["headers"]}


@pytest.mark.parametrize("value", ["not a target %%", "127.0.0.1:1,127.0.0.1:2", "host"])
async def test_an_unusable_source_is_a_400_and_reaches_no_engine(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, value: str
) -> None:
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port, kv_connector="offloading")
    async with client.post(
        sidecar.url + "/v1/completions", json=_body(), headers={HEADER: value}
    ) as r:
        assert r.status == 400
        assert HEADER in (await r.json())["error"]["message"]
    assert (await d.stats())["requests_total"] == 0


async def test_ssrf_protection_refuses_a_source_outside_the_allowlist(
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
    recording_server: RecordingServer,
    tmp_path: Path,
) -> None:
    d = await start_sim(zero_latency=True)
    target = f"127.0.0.1:{recording_server.port}"

    async def sidecar_allowing(hosts: list[str]) -> Any:
        path = tmp_path / f"allow-{len(hosts)}.yaml"
        entries = "".join(f"  - host: {h}\n    ports: [{recording_server.port}]\n" for h in hosts)
        path.write_text("allow:\n" + entries if entries else "allow: []\n")
        # Were the pull to happen, the engine would connect to the recording server.
        return await start_sidecar(
            model_server_port=d.port,
            kv_connector="offloading",
            p2p_connector_port=recording_server.port,
            enable_ssrf_protection=True,
            ssrf_allowlist_file=str(path),
        )

    denying = await sidecar_allowing([])
    headers = {HEADER: target}
    async with client.post(denying.url + "/v1/completions", json=_body(), headers=headers) as r:
        assert r.status == 403
        assert "kv-source" in (await r.json())["error"]["message"]
    assert (await d.stats())["requests_total"] == 0
    assert recording_server.connections == 0
    assert (
        denying.sample(
            "pd_sidecar_ssrf_decisions_total",
            stage="kv-source",
            decision="deny",
            rule="not-in-pool",
        )
        == 1
    )

    # The control: the same request, allowed, does reach the recording server.
    allowing = await sidecar_allowing(["127.0.0.1"])
    async with client.post(allowing.url + "/v1/completions", json=_body(), headers=headers) as r:
        assert r.status == 200
    assert recording_server.connections == 1
    assert recording_server.requests == [b"POST /sim/p2p/lookup HTTP/1.1"]
    assert (
        allowing.sample(
            "pd_sidecar_ssrf_decisions_total", stage="kv-source", decision="allow", rule="allowed"
        )
        == 1
    )


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def test_offloading_pd_prefill_pulls_from_the_source_then_hands_over(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    # Every engine's tier listens on --p2p-connector-port: the prefill engine and the
    # source get their own loopback address and share that port number.
    tier = _free_port("127.0.0.2")
    p = await start_sim(zero_latency=True, host="127.0.0.2", nixl_side_channel_port=tier)
    source = await start_sim(zero_latency=True, host="127.0.0.3", nixl_side_channel_port=tier)
    d = await start_sim(zero_latency=True)
    await _warm(client, source)
    sidecar = await start_sidecar(
        model_server_port=d.port, kv_connector="offloading", p2p_connector_port=tier
    )
    headers = {"x-prefiller-host-port": p.host_port, HEADER: source.host_port}
    async with client.post(sidecar.url + "/v1/completions", json=_body(), headers=headers) as r:
        assert r.status == 200
    p_stats, d_stats, s_stats = await p.stats(), await d.stats(), await source.stats()
    [p_rec], [d_rec] = p_stats["recorded"], d_stats["recorded"]
    p_params = p_rec["body"]["kv_transfer_params"]
    assert set(p_params) == {"remote_decoder", "remote_kv_source"}
    assert p_params["remote_kv_source"]["remote_host"] == "127.0.0.3"
    assert list(d_rec["body"]["kv_transfer_params"]) == ["remote_prefiller"]
    assert d_rec["body"]["kv_transfer_params"]["remote_prefiller"]["remote_host"] == "127.0.0.2"
    # The prefill pulled the prefix from the source; the decode took the prefill's KV.
    assert p_stats["p2p_blocks_pulled"] > 0
    assert s_stats["p2p_blocks_served"] == p_stats["p2p_blocks_pulled"]
    assert (p_stats["kv_pulls_served"], d_stats["kv_pulls_ok"]) == (1, 1)
