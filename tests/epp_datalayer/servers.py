"""A small controllable HTTP server for data-source tests (an exporter, a metrics page)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class PageServer:
    """Serves ``body`` at ``path`` (status ``status``); counts the requests it answers."""

    path: str = "/metrics"
    body: str = ""
    status: int = 200
    host: str = "127.0.0.1"
    port: int = 0
    ssl_context: ssl.SSLContext | None = None
    hits: int = 0
    runner: web.AppRunner | None = field(default=None, repr=False)

    async def _handle(self, _: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(status=self.status, text=self.body, content_type="text/plain")

    async def start(self) -> PageServer:
        app = web.Application()
        app.router.add_get(self.path, self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


VLLM_PAGE = (
    "# TYPE vllm:num_requests_waiting gauge\n"
    'vllm:num_requests_waiting{model_name="m"} 3\n'
    'vllm:num_requests_running{model_name="m"} 2\n'
    'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
)
