"""Liveness (always, while the process serves) and readiness (the local vLLM answers).

Readiness probes the model server's ``/health``; one probe is shared by all callers and
its answer is cached for ``ttl`` seconds. Draining makes the sidecar not ready at once.
"""

from __future__ import annotations

import asyncio

import aiohttp

__all__ = ["Readiness"]


class Readiness:
    def __init__(
        self, session: aiohttp.ClientSession, health_url: str, *, ttl: float, timeout: float
    ) -> None:
        self._session = session
        self._url = health_url
        self._ttl = ttl
        self._timeout = timeout
        self._checked_at = float("-inf")
        self._ready = False
        self._probe: asyncio.Task[bool] | None = None
        self.draining = False

    async def ready(self) -> bool:
        if self.draining:
            return False
        loop = asyncio.get_running_loop()
        if loop.time() - self._checked_at < self._ttl:
            return self._ready
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._check())
        return await asyncio.shield(self._probe)

    async def _check(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session.get(self._url) as response:
                    await response.read()
                    ready = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ready = False
        self._ready = ready
        self._checked_at = asyncio.get_running_loop().time()
        return ready

    async def close(self) -> None:
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
