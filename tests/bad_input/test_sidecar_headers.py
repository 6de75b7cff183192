"""Hostile headers at the sidecar: injection, spoofed routing headers, huge target lists."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import pytest
import pytest_asyncio
import yaml

from sidecar.routing import MAX_TARGETS
from tests.bad_input.conftest import PD, server_errors, start_sidecar

if TYPE_CHECKING:
    from sidecar.app import Servers

pytestmark = [pytest.mark.bad_input, pytest.mark.asyncio(loop_scope="module")]

COMPLETIONS = "/v1/completions"
BODY = {"model": "sim-model", "prompt": "hello", "max_tokens": 2}
_FRESH_ID = re.compile(r"^[0-9a-f]{32}$")


async def _raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[bytes, bytes]:
    """Send bytes as they are (no client library would send these); (status line, rest)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.read()
    finally:
        writer.close()
    status, _, rest = answer.partition(b"\r\n")
    return status, rest


def _head(path: str, *lines: bytes, length: int = 0) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n".encode()
        + b"".join(line + b"\r\n" for line in lines)
        + f"Content-Length: {length}\r\nConnection: close\r\n\r\n".encode()
    )


@pytest.mark.parametrize(
    "line",
    [
        b"x-request-id: abc\rX-Injected: yes",
        b"x-request-id: abc\nX-Injected: yes",
        b"x-request-id: abc\r\rX-Injected: yes",
        b"x-request-id: a\x00b",
        b"x-request-id: abc\r\n folded: continuation",
        b"x-prefiller-host-port: 127.0.0.1:1\rX-Injected: yes",
        b"traceparent: 00-\x01",
    ],
    ids=["bare-cr", "bare-lf", "double-cr", "nul", "obs-fold", "routing-cr", "ctl"],
)
async def test_control_characters_in_headers_are_refused_quietly(
    pd: PD, caplog: pytest.LogCaptureFixture, line: bytes
) -> None:
    """CR/LF/NUL inside a header value: 400 before any handler runs, nothing forwarded,
    nothing echoed, and one warning (not an error with a traceback) in the log."""
    caplog.set_level(logging.INFO)
    body = b'{"model":"sim-model","prompt":"hi","max_tokens":2}'
    status, rest = await _raw_request(pd.port, _head(COMPLETIONS, line, length=len(body)), body)
    assert b" 400 " in status, status + rest
    assert b"x-injected" not in rest.lower().split(b"\r\n\r\n")[0]
    assert (await pd.decode.stats())["requests_total"] == 0
    assert (await pd.prefill.stats())["requests_total"] == 0
    assert server_errors(caplog.records) == []
    [warning] = [r for r in caplog.records if r.name == "pd_sidecar.http"]
    assert warning.levelno == logging.WARNING
    assert isinstance(warning.msg, dict) and warning.msg["event"] == "unparsable_request"
    await pd.healthy()


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"client-id-7", True),
        ("ид-запроса".encode(), True),  # printable non-ASCII (UTF-8) is a sane id
        (b"tab\there", False),
        (b"\xff\xfe", False),  # not UTF-8: never echoed as mojibake
        (b"x" * 257, False),  # too long to log and echo
    ],
    ids=["ascii", "utf8", "tab", "invalid-utf8", "too-long"],
)
async def test_request_id_is_the_clients_only_when_sane(pd: PD, sent: bytes, kept: bool) -> None:
    body = b'{"model":"sim-model","prompt":"hi","max_tokens":2}'
    head = _head(
        COMPLETIONS,
        b"x-request-id: " + sent,
        f"x-prefiller-host-port: {pd.prefill.host_port}".encode(),
        length=len(body),
    )
    status, rest = await _raw_request(pd.port, head, body)
    assert b" 200 " in status, status + rest
    headers = rest.split(b"\r\n\r\n")[0].split(b"\r\n")
    [echoed] = [h.split(b":", 1)[1].strip() for h in headers if h.lower().startswith(b"x-request")]
    [seen] = [r["headers"]["x-request-id"] for r in (await pd.prefill.stats())["recorded"]]
    # The engines always get a fresh id of ours; the client gets its own back if sane.
    assert _FRESH_ID.match(seen), seen
    if kept:
        assert echoed == sent
    else:
        assert echoed.decode() == seen


async def test_routing_headers_never_reach_an_engine(pd: PD) -> None:
    """Every routing header a client adds stops at the sidecar, on both legs."""
    spoofed = {
        "x-gateway-destination-endpoint": "169.254.169.254:80",
        "x-kv-cache-source-host-port": "169.254.169.254:80",
        # Honoured when it names a rank of this sidecar (see tests/sidecar_dp), then dropped.
        "x-data-parallel-host-port": f"127.0.0.1:{pd.port}",
        "x-data-parallel-rank": "7",
        "x-encoder-hosts-ports": "169.254.169.254:80",  # no encode stage configured
    }
    for route in (pd.route, {}):  # P/D, and the local (aggregated) path
        async with pd.session.post(
            f"{pd.url}{COMPLETIONS}", json=BODY, headers={**spoofed, **route}
        ) as resp:
            assert resp.status == 200, await resp.text()
    recorded = (await pd.prefill.stats())["recorded"] + (await pd.decode.stats())["recorded"]
    assert len(recorded) == 3  # prefill + decode legs, then one local request
    for request in recorded:
        leaked = {name for name in request["headers"] if name.lower() in spoofed}
        assert leaked == set(), request["headers"]
        assert "x-prefiller-host-port" not in {n.lower() for n in request["headers"]}


@pytest.mark.parametrize(
    "target",
    [
        "evil.example#@127.0.0.1:{port}",  # would connect to evil.example, not 127.0.0.1
        "evil.example?@127.0.0.1:{port}",
        "user@127.0.0.1:{port}",
        "127.0.0.1\t:{port}",
        "a..b:{port}",  # used to be a 500 from the IDNA codec
        "{long}:{port}",  # a 64-character label: the same
        "127.0.0.1:\u0663",  # a non-ASCII digit as the port
        "http://127.0.0.1:{port}/path",
    ],
)
async def test_targets_that_are_not_host_port_are_400(
    pd: PD, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    value = target.format(port=pd.prefill.port, long="a" * 64)
    async with pd.session.post(
        f"{pd.url}{COMPLETIONS}", json=BODY, headers={"x-prefiller-host-port": value}
    ) as resp:
        assert resp.status == 400, await resp.text()
        answer = await resp.json()
    assert "x-prefiller-host-port" in answer["error"]["message"]
    assert (await pd.prefill.stats())["requests_total"] == 0
    assert server_errors(caplog.records) == []


@pytest.mark.parametrize("header", ["x-prefiller-host-port", "x-encoder-hosts-ports"])
async def test_thousands_of_targets_are_a_quick_400(
    pd: PD, caplog: pytest.LogCaptureFixture, header: str
) -> None:
    """1900 short targets fit aiohttp's 8190-byte header line; the list is refused by
    count (not parsed and checked one by one), well within a deadline."""
    value = ",".join(f"{chr(97 + i % 26)}:{1 + i % 9}" for i in range(1900))
    assert len(value) < 8190
    route = {} if header == "x-prefiller-host-port" else pd.route
    async with asyncio.timeout(10):
        async with pd.session.post(
            f"{pd.url}{COMPLETIONS}", json=BODY, headers={**route, header: value}
        ) as resp:
            status, text = resp.status, await resp.text()
    if header == "x-encoder-hosts-ports":
        # Without an encode stage the header is ignored (and stripped), not parsed.
        assert status == 200, text
    else:
        assert status == 400, text
        assert f"at most {MAX_TARGETS}" in text
        assert len(text) < 1000  # the answer names the count, it does not echo the list
    assert server_errors(caplog.records) == []


async def test_a_header_over_the_line_limit_is_refused_by_the_parser(
    pd: PD, caplog: pytest.LogCaptureFixture
) -> None:
    value = b",".join(b"10.0.%d.%d:8000" % (i // 250, i % 250) for i in range(5000))
    started = time.perf_counter()
    status, _ = await _raw_request(
        pd.port, _head(COMPLETIONS, b"x-prefiller-host-port: " + value, length=2), b"{}"
    )
    assert b" 400 " in status, status
    assert time.perf_counter() - started < 2.0
    assert server_errors(caplog.records) == []
    await pd.healthy()


# -- with SSRF protection: the allowlist decides, whatever the client wrote --------------


@dataclass
class Guarded:
    pd: PD
    servers: Servers
    trap: asyncio.Server
    trap_port: int
    trap_hits: list[int]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.servers.port}"

    def denials(self, rule: str, stage: str = "prefill") -> float:
        value = self.servers.metrics.registry.get_sample_value(
            "pd_sidecar_ssrf_decisions_total", {"stage": stage, "decision": "deny", "rule": rule}
        )
        return value or 0.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guarded(
    pd_module: PD, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Guarded]:
    """A second sidecar in front of the same decode sim, allowing only the prefill sim;
    a listening 'trap' socket on 127.0.0.1 counts connections a spoof would cause."""
    hits: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(1)
        writer.close()

    trap = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    trap_port = int(trap.sockets[0].getsockname()[1])
    allowlist = tmp_path_factory.mktemp("ssrf") / "allow.yaml"
    allowlist.write_text(
        yaml.safe_dump(
            {
                "allow": [
                    {"host": "127.0.0.1", "ports": [pd_module.prefill.port], "roles": ["prefill"]}
                ]
            }
        )
    )
    servers = await start_sidecar(
        pd_module.decode.port,
        enable_ssrf_protection=True,
        ssrf_allowlist_file=str(allowlist),
        prefill_max_retries=0,
    )
    try:
        yield Guarded(pd_module, servers, trap, trap_port, hits)
    finally:
        await servers.drain_and_stop()
        trap.close()
        with contextlib.suppress(Exception):
            await trap.wait_closed()


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("127.0.0.1:{trap}", "port-not-target-port"),
        ("169.254.169.254:80", "not-in-pool"),
        ("localhost:{trap}", "not-in-pool"),
        ("[::ffff:127.0.0.1]:{trap}", "not-in-pool"),
        ("127.0.0.1:{prefill},127.0.0.1:{trap}", "port-not-target-port"),
    ],
)
async def test_spoofed_prefill_target_is_refused_before_any_connection(
    guarded: Guarded, caplog: pytest.LogCaptureFixture, value: str, rule: str
) -> None:
    caplog.set_level(logging.INFO)
    await guarded.pd.prefill.reset()
    target = value.format(trap=guarded.trap_port, prefill=guarded.pd.prefill.port)
    before = guarded.denials(rule)
    async with guarded.pd.session.post(
        f"{guarded.url}{COMPLETIONS}",
        json=BODY,
        headers={"x-prefiller-host-port": target, "x-request-id": "spoof-1"},
    ) as resp:
        assert resp.status == 403, await resp.text()
        answer = await resp.json()
    assert answer["error"]["rule"] == rule
    assert answer["error"]["request_id"] == "spoof-1"
    assert guarded.denials(rule) == before + 1
    assert guarded.trap_hits == []
    assert (await guarded.pd.prefill.stats())["requests_total"] == 0
    assert any(
        isinstance(r.msg, dict)
        and r.msg.get("client_request_id") == "spoof-1"
        and r.msg.get("rule")
        for r in caplog.records
    )
    assert server_errors(caplog.records) == []


async def test_spoofed_encoder_target_is_refused_too(guarded: Guarded) -> None:
    """The guard checks the encoder header as well, even on a sidecar without encoders."""
    async with guarded.pd.session.post(
        f"{guarded.url}{COMPLETIONS}",
        json=BODY,
        headers={
            "x-prefiller-host-port": guarded.pd.prefill.host_port,
            "x-encoder-hosts-ports": f"127.0.0.1:{guarded.trap_port}",
        },
    ) as resp:
        assert resp.status == 403, await resp.text()
    assert guarded.trap_hits == []


async def test_allowed_target_still_serves_and_many_targets_stay_bounded(
    guarded: Guarded, caplog: pytest.LogCaptureFixture
) -> None:
    allowed = guarded.pd.prefill.host_port
    async with guarded.pd.session.post(
        f"{guarded.url}{COMPLETIONS}", json=BODY, headers={"x-prefiller-host-port": allowed}
    ) as resp:
        assert resp.status == 200, await resp.text()
    # The most a header may list, every one allowed: checked one by one, still quick.
    value = ",".join([allowed] * MAX_TARGETS)
    started = time.perf_counter()
    async with guarded.pd.session.post(
        f"{guarded.url}{COMPLETIONS}", json=BODY, headers={"x-prefiller-host-port": value}
    ) as resp:
        assert resp.status == 200, await resp.text()
    assert time.perf_counter() - started < 1.0
    # One more is refused before the guard looks at any of them.
    async with guarded.pd.session.post(
        f"{guarded.url}{COMPLETIONS}",
        json=BODY,
        headers={"x-prefiller-host-port": value + f",127.0.0.1:{guarded.trap_port}"},
    ) as resp:
        assert resp.status == 400, await resp.text()
    assert guarded.trap_hits == []
    assert server_errors(caplog.records) == []


async def test_guarded_sidecar_stays_healthy(guarded: Guarded) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{guarded.url}/health") as resp:
        assert resp.status == 200


async def test_thousands_of_encoders_with_an_encode_stage_are_a_quick_400(
    pd: PD, caplog: pytest.LogCaptureFixture
) -> None:
    servers = await start_sidecar(pd.decode.port, ec_connector="ec-example")
    try:
        value = ",".join(f"{chr(97 + i % 26)}:{1 + i % 9}" for i in range(1900))
        started = time.perf_counter()
        async with asyncio.timeout(2):
            async with pd.session.post(
                f"http://127.0.0.1:{servers.port}{COMPLETIONS}",
                json=BODY,
                headers={**pd.route, "x-encoder-hosts-ports": value},
            ) as resp:
                status, answer = resp.status, await resp.json()
        assert time.perf_counter() - started < 1.0
    finally:
        await servers.drain_and_stop()
    assert status == 400
    assert "x-encoder-hosts-ports" in answer["error"]["message"]
    assert f"at most {MAX_TARGETS}" in answer["error"]["message"]
    assert (await pd.prefill.stats())["requests_total"] == 0
    assert server_errors(caplog.records) == []


async def test_absolute_form_targets_are_served_as_their_path(
    pd: PD, caplog: pytest.LogCaptureFixture
) -> None:
    """``POST http://elsewhere/v1/completions`` (RFC 9112 absolute-form): the sidecar
    serves the path on its own engines; the host in the target is never contacted.
    It used to be appended to the engine URL as it stood: a 502 blamed on the decode,
    after a prefill had already run."""
    body = b'{"model":"sim-model","prompt":"hi","max_tokens":2}'
    head = (
        b"POST http://169.254.169.254:80/v1/completions?x=1 HTTP/1.1\r\nHost: sidecar\r\n"
        + f"x-prefiller-host-port: {pd.prefill.host_port}\r\n".encode()
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    )
    status, rest = await _raw_request(pd.port, head, body)
    assert b" 200 " in status, status + rest
    [decode_leg] = (await pd.decode.stats())["recorded"]
    assert decode_leg["path"] == "/v1/completions"
    assert (await pd.prefill.stats())["requests_total"] == 1
    status, rest = await _raw_request(
        pd.port,
        b"GET http://169.254.169.254/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert b" 200 " in status, status + rest
    assert server_errors(caplog.records) == []
