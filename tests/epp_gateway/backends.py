"""Recording aiohttp backends standing in for decode pods behind the gateway."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["Recorded", "RecordingBackend"]


@dataclass
class Recorded:
    path: str
    headers: dict[str, list[str]]
    body: bytes


@dataclass
class RecordingBackend:
    """``POST /stream`` answers SSE and holds its last event until ``release`` is set."""

    name: str
    # Loopback has a whole /8: pods that must differ by IP listen on their own address.
    host: str = "127.0.0.1"
    requests: list[Recorded] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    first_event_sent: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    port: int = 0
    # Set: plain answers wait for ``release`` first (a request held in flight).
    hold: bool = False
    received: asyncio.Event = field(default_factory=asyncio.Event)
    # Headers added to every plain answer.
    answer_headers: dict[str, str] = field(default_factory=dict)

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/stream", self._stream)
        app.router.add_route("*", "/big/{size}", self._big)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _metrics(self, _: web.Request) -> web.Response:
        # An idle engine, so a scheduler scraping it sees fresh signals.
        return web.Response(
            text="vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n"
            "vllm:kv_cache_usage_perc 0.0\n"
        )

    async def _record(self, request: web.Request) -> Recorded:
        headers: dict[str, list[str]] = {}
        for key, value in request.headers.items():
            headers.setdefault(key.lower(), []).append(value)
        rec = Recorded(request.path, headers, await request.read())
        self.requests.append(rec)
        return rec

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        rec = await self._record(request)
        answer = {
            "pod": self.name,
            "size": len(rec.body),
            "sha256": hashlib.sha256(rec.body).hexdigest(),
        }
        if not self.hold:
            self.received.set()
            return web.json_response(answer, headers=self.answer_headers)
        # Held: the headers go out now, the body once released.
        resp = web.StreamResponse(
            headers={"content-type": "application/json", **self.answer_headers}
        )
        await resp.prepare(request)
        self.received.set()
        await asyncio.wait_for(self.release.wait(), 30)
        await resp.write(json.dumps(answer).encode())
        await resp.write_eof()
        return resp

    async def _big(self, request: web.Request) -> web.Response:
        await self._record(request)
        size = int(request.match_info["size"])
        return web.Response(body=bytes(i % 253 for i in range(size)))

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: " + json.dumps({"pod": self.name, "n": 1}).encode() + b"\n\n")
        self.first_event_sent.set()
        await asyncio.wait_for(self.release.wait(), 30)
        await resp.write(b"data: " + json.dumps({"pod": self.name, "n": 2}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
