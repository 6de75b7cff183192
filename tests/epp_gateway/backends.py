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
    requests: list[Recorded] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    first_event_sent: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/stream", self._stream)
        app.router.add_route("*", "/big/{size}", self._big)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
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

    async def _echo(self, request: web.Request) -> web.Response:
        rec = await self._record(request)
        return web.json_response(
            {
                "pod": self.name,
                "size": len(rec.body),
                "sha256": hashlib.sha256(rec.body).hexdigest(),
            }
        )

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
