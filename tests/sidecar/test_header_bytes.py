"""Header fields cross the sidecar byte for byte, whatever bytes above 0x7F they carry.

A field value may hold any byte above 0x7F (RFC 9110 5.5): UTF-8 text, or bytes that are
not UTF-8 at all. Both directions are checked on raw sockets, on the P/D path (both legs),
on passthrough and through the encode stage: the engines see the client's bytes, the client
sees the engine's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.sidecar.conftest import StartSidecar

# UTF-8 text ("café €"), and bytes that are not UTF-8.
CLIENT_FIELDS = b"x-note: caf\xc3\xa9 \xe2\x82\xac\r\nx-raw: \xff\x80 end\r\n"
ENGINE_FIELD = b"x-engine-note: \xc3\xa9\xff\r\n"

PREFILL_ANSWER: dict[str, object] = {
    "choices": [{"index": 0, "text": " a", "finish_reason": "length"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    "kv_transfer_params": {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": "stub",
        "remote_block_ids": [1],
        "remote_host": "127.0.0.1",
        "remote_port": 5600,
    },
}
DECODE_ANSWER: dict[str, object] = {
    "choices": [{"index": 0, "text": " a b", "finish_reason": "length"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


@dataclass
class Engine:
    """A raw HTTP/1.1 engine: records each request's head, answers ``answer`` as JSON
    with ``ENGINE_FIELD`` among its headers."""

    answer: dict[str, object]
    heads: list[bytes] = field(default_factory=list)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                body = json.dumps(self.answer).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + ENGINE_FIELD
                    + b"content-length: %d\r\n\r\n" % len(body) + body
                )  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def engines() -> AsyncIterator[tuple[Engine, Engine]]:
    prefill, decode = Engine(PREFILL_ANSWER), Engine(DECODE_ANSWER)
    servers = []
    for engine in (prefill, decode):
        server = await asyncio.start_server(engine.serve, "127.0.0.1", 0)
        engine.port = server.sockets[0].getsockname()[1]
        servers.append(server)
    try:
        yield prefill, decode
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


async def _ask(port: int, head: bytes, body: bytes = b"") -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"Connection: close\r\n" + CLIENT_FIELDS + b"\r\n" + body)
        answer = await reader.read()
    finally:
        writer.close()
    answer_head, _, answer_body = answer.partition(b"\r\n\r\n")
    return answer_head + b"\r\n", answer_body


async def test_pd_legs_carry_the_clients_bytes_and_the_client_gets_the_engines(
    engines: tuple[Engine, Engine], start_sidecar: StartSidecar
) -> None:
    prefill, decode = engines
    sidecar = await start_sidecar(model_server_port=decode.port)
    body = json.dumps({"model": "m", "prompt": "hello there", "max_tokens": 2}).encode()
    head, answer = await _ask(
        sidecar.servers.port,
        b"POST /v1/completions HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
        b"x-prefiller-host-port: 127.0.0.1:%d\r\nContent-Length: %d\r\n"
        % (prefill.port, len(body)),
        body,
    )
    assert head.startswith(b"HTTP/1.1 200 "), head + answer
    assert json.loads(answer)["choices"][0]["text"] == " a b"
    assert ENGINE_FIELD in head
    for leg in (prefill.heads, decode.heads):
        assert len(leg) == 1
        assert CLIENT_FIELDS in leg[0]


async def test_passthrough_carries_the_clients_bytes_and_the_client_gets_the_engines(
    engines: tuple[Engine, Engine], start_sidecar: StartSidecar
) -> None:
    _, decode = engines
    sidecar = await start_sidecar(model_server_port=decode.port)
    head, _ = await _ask(sidecar.servers.port, b"GET /v1/models HTTP/1.1\r\nHost: sidecar\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert ENGINE_FIELD in head
    assert len(decode.heads) == 1
    assert CLIENT_FIELDS in decode.heads[0]


async def test_the_encode_stage_takes_the_same_bytes_to_the_encoders_and_on(
    engines: tuple[Engine, Engine], start_sim: Any, start_sidecar: StartSidecar
) -> None:
    _, decode = engines
    encoder = await start_sim(zero_latency=True, role="encode", ec_connector="ec-nixl")
    sidecar = await start_sidecar(model_server_port=decode.port, ec_connector="ec-nixl")
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}
    message = {"role": "user", "content": [{"type": "text", "text": "what is it"}, image]}
    body = json.dumps({"model": "sim-model", "messages": [message], "max_tokens": 2}).encode()
    head, answer = await _ask(
        sidecar.servers.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: sidecar\r\n"
        b"Content-Type: application/json\r\nx-encoder-hosts-ports: %s\r\n"
        b"Content-Length: %d\r\n" % (encoder.host_port.encode(), len(body)),
        body,
    )
    assert head.startswith(b"HTTP/1.1 200 "), head + answer
    stats = await encoder.stats()
    assert stats["encodes"] == 1
    # The simulator reads header bytes as the sidecar does (UTF-8, surrogate escapes).
    seen = stats["recorded"][0]["headers"]
    assert seen["x-note"] == "café €"
    assert seen["x-raw"].encode("utf-8", "surrogateescape") == b"\xff\x80 end"
    assert len(decode.heads) == 1
    assert CLIENT_FIELDS in decode.heads[0]
