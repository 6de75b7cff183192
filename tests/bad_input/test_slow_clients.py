"""Slow clients (a byte at a time, raw sockets): every phase ends within a server timeout.

Bounds, as configured by the product:

- sidecar, P/D body (buffered before any leg): ``--request-body-timeout`` -> 408 JSON;
- sidecar, passthrough body (streamed to the engine as it arrives): the engine's
  ``--decode-first-byte-timeout`` -> 504 JSON;
- sidecar, request headers: the server's keep-alive timeout (the only bound aiohttp has
  before a request is complete), which starts when the connection opens: 75 s, with
  Envoy letting go of idle connections to the sidecars first (60 s);
- gateway: Envoy's ``request_headers_timeout`` and ``request_timeout`` -> 408.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from epp import envoy_config
from sidecar.app import SERVER_KEEPALIVE_S
from tests.bad_input.conftest import (
    BODY_DEADLINE_S,
    GATEWAY_REQUEST_TIMEOUT_S,
    PD,
    Gateway,
    server_errors,
    start_sidecar,
)
from tests.conftest import eventually

pytestmark = [pytest.mark.bad_input, pytest.mark.asyncio(loop_scope="module")]

_BYTE_GAP_S = 0.02  # far below every timeout: the client is slow, never idle
# Timing bounds from above are loose on purpose: a shared CI machine can stall every
# process for seconds. That a server timeout (not the end of the request) ended the
# exchange is shown by the bytes still unsent when it ended.


class SlowClient:
    """Sends a request one byte at a time until the server answers or hangs up."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = 0  # bytes trickled before the answer or the close

    async def run(
        self, trickled: bytes, *, at_once: bytes = b"", deadline_s: float
    ) -> tuple[bytes, float]:
        """Send ``at_once`` whole, then ``trickled`` a byte at a time. Returns the answer's
        head (b"" when closed without an answer) and the seconds since the trickle began."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(at_once)
        await writer.drain()
        started = time.perf_counter()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in trickled:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    self.sent += 1
                    await asyncio.sleep(_BYTE_GAP_S)  # the client's pace, not synchronisation

        feeder = asyncio.ensure_future(trickle())
        try:
            async with asyncio.timeout(deadline_s):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as closed:
                    head = closed.partial
                except ConnectionResetError:
                    # Closed without an answer: a server that closes with our bytes
                    # still unread in its buffer resets instead of a clean close.
                    head = b""
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return head, time.perf_counter() - started


def _head(path: str, length: int, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: slow", "Content-Type: application/json"]
    lines += [*extra, f"Content-Length: {length}", "", ""]
    return "\r\n".join(lines).encode()


_BODY = b'{"model": "sim-model", "prompt": "' + b"slow " * 400 + b'", "max_tokens": 2}'


async def test_pd_body_a_byte_at_a_time_is_408_after_the_body_deadline(
    pd: PD, caplog: pytest.LogCaptureFixture
) -> None:
    client = SlowClient(pd.port)
    head = _head(
        "/v1/completions",
        len(_BODY),
        f"x-prefiller-host-port: {pd.prefill.host_port}",
        "x-request-id: slow-body",
    )
    # The headers at once: this test is about the body.
    headers, elapsed = await client.run(_BODY, at_once=head, deadline_s=BODY_DEADLINE_S + 3)
    assert headers.startswith(b"HTTP/1.1 408"), headers
    assert b"application/json" in headers
    assert elapsed >= BODY_DEADLINE_S
    assert client.sent < len(_BODY)
    assert (await pd.prefill.stats())["requests_total"] == 0
    assert any(
        isinstance(r.msg, dict) and r.msg.get("client_request_id") == "slow-body"
        for r in caplog.records
    )
    assert server_errors(caplog.records) == []
    await pd.healthy()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        # Passthrough: the body streams to the engine, which answers once it has it all.
        ("/tokenize", b"504"),
        # A decode-only generation request is read (and checked) first: its own timeout.
        ("/v1/completions", b"408"),
    ],
)
async def test_passthrough_body_a_byte_at_a_time_ends_at_a_timeout(
    caplog: pytest.LogCaptureFixture, pd: PD, path: str, status: bytes
) -> None:
    servers = await start_sidecar(
        pd.decode.port, decode_first_byte_timeout=0.5, request_body_timeout=0.5
    )
    try:
        client = SlowClient(servers.port)
        request = _head(path, len(_BODY)) + _BODY
        # The whole request would take 40 s to trickle; the timeout ends it much sooner.
        line, _ = await client.run(request, deadline_s=30)
    finally:
        await servers.drain_and_stop()
    assert line.startswith(b"HTTP/1.1 " + status), line
    assert client.sent < len(request)
    assert server_errors(caplog.records) == []


async def test_headers_a_byte_at_a_time_are_cut_by_the_keepalive_timeout(
    pd: PD, caplog: pytest.LogCaptureFixture
) -> None:
    """The sidecar's server closes a connection that has not completed a request's
    headers within its keep-alive timeout, counted from the connection's start (the
    sidecar's is 75 s, see the next test). Shown here with a short timeout: the slow
    headers never reach a handler."""
    from aiohttp import web

    from sidecar.log import http_log
    from sidecar.server import Request, Response, Server, StreamResponse

    handled: list[str] = []

    async def handler(request: Request) -> StreamResponse:
        handled.append(request.path)
        return Response()

    server = Server(handler, web.Application(), keepalive_timeout=0.5, log=http_log)
    port = await server.listen("127.0.0.1", 0)
    try:
        client = SlowClient(port)
        # About 10 s of headers at the client's pace, cut at 0.5 s.
        request = _head("/x", 2, "x-padding: " + "p" * 400) + b"{}"
        line, elapsed = await client.run(request, deadline_s=15)
    finally:
        await server.shutdown(1.0)
    assert line == b"", line  # closed, no answer and no handler
    assert handled == []
    assert elapsed >= 0.45  # not before the timeout, to the loop's resolution
    assert client.sent < len(request)
    assert server_errors(caplog.records) == []


async def test_sidecar_keepalive_bounds_headers_and_outlasts_envoys_idle_timeout(
    pd: PD,
) -> None:
    assert pd.servers.server.keepalive_timeout == SERVER_KEEPALIVE_S
    # Envoy closes an idle pooled connection before the sidecar would, so a request is
    # never sent on a connection the sidecar is closing at that moment.
    [pods] = [
        c
        for c in envoy_config.gateway_config(1)["static_resources"]["clusters"]
        if c["name"] == "pods"
    ]
    options = pods["typed_extension_protocol_options"]
    [http] = options.values()
    assert (
        http["common_http_protocol_options"]["idle_timeout"]
        == f"{envoy_config.POD_IDLE_TIMEOUT_S}s"
    )
    assert envoy_config.POD_IDLE_TIMEOUT_S < SERVER_KEEPALIVE_S


@pytest.mark.envoy
async def test_gateway_bounds_slow_headers_and_bodies(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Through Envoy: headers or a body a byte at a time end with 408 from the gateway;
    the EPP's stream for the request ends with it (nothing stays in flight)."""
    caplog.set_level(logging.INFO)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 400 + b'"}]}'
    head = _head("/v1/chat/completions", len(body))
    decided_before = len(gateway.epp.decode.requests)
    for what, first, rest in (("headers", b"", head + body), ("body", head, body)):
        client = SlowClient(gateway.port)
        line, _ = await client.run(rest, at_once=first, deadline_s=GATEWAY_REQUEST_TIMEOUT_S + 8)
        assert line.startswith(b"HTTP/1.1 408"), (what, line)
        assert client.sent < len(rest), what
    assert len(gateway.epp.decode.requests) == decided_before  # nothing was routed
    registry = gateway.epp.app.metrics.registry

    async def streams_closed() -> bool:  # the EPP learns of the reset asynchronously
        return registry.get_sample_value("llm_d_epp_extproc_streams_inflight") == 0

    await eventually(streams_closed, "every ext_proc stream closed", timeout=5)
    assert server_errors(caplog.records) == []


async def test_product_gateway_config_bounds_slow_clients() -> None:
    hcm = envoy_config.gateway_config(9002)["static_resources"]["listeners"][0]
    typed = hcm["filter_chains"][0]["filters"][0]["typed_config"]
    for name in ("request_headers_timeout", "request_timeout"):
        value = typed[name]
        assert value.endswith("s") and 0 < float(value[:-1]) <= 300, (name, value)
