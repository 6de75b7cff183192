"""A zero-cost fake vLLM for proxy benchmarks: canned answers, no parsing beyond framing.

One process (uvloop when installed) serves a prefill port and a decode port over raw
HTTP/1.1 keep-alive (an ``asyncio.Protocol``, no web framework), so that the proxy, not
the engine, is what a benchmark measures.

- ``GET /health``: 200.
- prefill port, any POST: a one-token completion carrying ``kv_transfer_params`` (the
  NIXL handshake a P/D proxy hands to the decode leg).
- decode port, any POST: ``--output-tokens`` tokens, as one SSE answer (chunked, one
  chunk per event, written at once) when the body asks for ``"stream": true``, else as
  one JSON completion.

    python benchmarks/_fake_engine.py --prefill-port P --decode-port D [--output-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from typing import cast

__all__ = ["main"]

_STREAM = re.compile(rb'"stream"\s*:\s*true')


def _response(status: str, content_type: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type
        + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def _answers(tokens: int) -> tuple[bytes, bytes, bytes, bytes]:
    usage = {"prompt_tokens": 64, "completion_tokens": tokens, "total_tokens": 64 + tokens}
    prefill = {
        "id": "cmpl-fake",
        "object": "text_completion",
        "model": "sim-model",
        "choices": [{"index": 0, "text": " a", "finish_reason": "length"}],
        "usage": {**usage, "completion_tokens": 1, "total_tokens": 65},
        "kv_transfer_params": {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": "fake-engine",
            "remote_block_ids": [1, 2, 3, 4],
            "remote_host": "127.0.0.1",
            "remote_port": 5600,
            "tp_size": 1,
        },
    }
    decode = {
        "id": "cmpl-fake",
        "object": "text_completion",
        "model": "sim-model",
        "choices": [{"index": 0, "text": " a" * tokens, "finish_reason": "length"}],
        "usage": usage,
    }
    events = []
    for i in range(tokens):
        chunk = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "model": "sim-model",
            "choices": [
                {"index": 0, "text": " a", "finish_reason": "length" if i == tokens - 1 else None}
            ],
        }
        events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    final = {"id": "cmpl-fake", "object": "text_completion", "model": "sim-model",
             "choices": [], "usage": usage}  # fmt: skip
    events.append(b"data: " + json.dumps(final).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    sse = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    sse_response = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n" + sse
    )
    return (
        _response("200 OK", b"application/json", json.dumps(prefill).encode()),
        _response("200 OK", b"application/json", json.dumps(decode).encode()),
        sse_response,
        _response("200 OK", b"application/json", b'{"status":"ok"}'),
    )


class _Engine(asyncio.Protocol):
    def __init__(self, prefill: bool, answers: tuple[bytes, bytes, bytes, bytes]) -> None:
        self.prefill = prefill
        self.answers = answers
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            start = end + 4
            if b"transfer-encoding: chunked" in head:
                body_end = self.buffer.find(b"\r\n0\r\n\r\n", start)
                if body_end < 0:
                    if self.buffer.startswith(b"0\r\n\r\n", start):
                        body_end = start - 2
                    else:
                        return
                body = self.buffer[start:body_end]
                rest = body_end + 7
            else:
                match = re.search(rb"content-length:\s*(\d+)", head)
                length = int(match.group(1)) if match else 0
                if len(self.buffer) < start + length:
                    return
                body = self.buffer[start : start + length]
                rest = start + length
            self.buffer = self.buffer[rest:]
            self.answer(head, body)

    def answer(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        prefill_json, decode_json, decode_sse, health = self.answers
        if head.startswith(b"get"):
            self.transport.write(health)
        elif self.prefill:
            self.transport.write(prefill_json)
        elif _STREAM.search(body):
            self.transport.write(decode_sse)
        else:
            self.transport.write(decode_json)


async def serve(prefill_port: int, decode_port: int, tokens: int) -> None:
    loop = asyncio.get_running_loop()
    answers = _answers(tokens)
    servers = [
        await loop.create_server(
            lambda prefill=prefill: _Engine(prefill, answers), "127.0.0.1", port, backlog=1024
        )
        for prefill, port in ((True, prefill_port), (False, decode_port))
    ]
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill-port", type=int, required=True)
    parser.add_argument("--decode-port", type=int, required=True)
    parser.add_argument("--output-tokens", type=int, default=16)
    args = parser.parse_args()
    coro = serve(args.prefill_port, args.decode_port, args.output_tokens)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
