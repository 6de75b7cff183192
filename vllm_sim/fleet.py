"""A pool of simulated engines in one process (``vllm-sim --fleet N``).

Every engine is a whole ``SimServer`` (its own port, batch, prefix cache, metrics and,
if asked, KV events); they share only the event loop, so a pool of a hundred engines
costs one process. Engines are on consecutive ports of one host, or, with distinct hosts,
each on its own loopback address with the same ports (as pods of a cluster are: a
client that reaches every engine's KV events on one port needs that).

The fleet also knows what no single engine can: for each prompt an engine computes, the
longest prefix any engine of the pool held at that moment. Summed, that is the prefix-hit
rate of an oracle router that knew every cache exactly (``/fleet/stats``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from .config import SimConfig
from .server import SimServer

__all__ = ["Fleet", "FleetOptions", "engine_host"]

MAX_FLEET = 1024


class FleetOptions(BaseModel):
    """How the engines of a fleet are laid out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(ge=1, le=MAX_FLEET)
    distinct_hosts: bool = False
    # First address of the distinct hosts (engine i gets this address + i).
    host_base: str = "127.0.1.1"
    control_port: int | None = Field(default=None, ge=0, le=65535)
    manifest: str | None = None  # write the engines' addresses here (JSON) once listening
    oracle: bool = True


def engine_host(options: FleetOptions, base: SimConfig, index: int) -> str:
    if not options.distinct_hosts:
        return base.host
    return str(ipaddress.ip_address(options.host_base) + index)


def _engine_config(base: SimConfig, options: FleetOptions, index: int) -> SimConfig:
    spread = not options.distinct_hosts  # same host: every engine needs its own ports

    def port(value: int | None) -> int | None:
        if value is None or value == 0 or not spread:
            return value
        return value + index

    return base.model_copy(
        update={
            "host": engine_host(options, base, index),
            "port": port(base.port),
            "engine_id": f"{base.engine_id}-{index}",
            "kv_events_port": port(base.kv_events_port),
            "kv_events_replay_port": port(base.kv_events_replay_port),
            # One side channel per engine: any free port unless the hosts differ.
            "nixl_side_channel_port": base.nixl_side_channel_port if not spread else 0,
        }
    )


class Fleet:
    """``async with Fleet(base, FleetOptions(size=32)) as fleet: fleet.servers[i].url``."""

    def __init__(self, base: SimConfig, options: FleetOptions) -> None:
        self.base = base
        self.options = options
        self.servers = [SimServer(_engine_config(base, options, i)) for i in range(options.size)]
        if options.oracle:
            for server in self.servers:
                server.engine.oracle = self.best_prefix_blocks
        self._control: web.AppRunner | None = None
        self.control_port: int | None = None

    # -- the oracle ------------------------------------------------------------------
    def best_prefix_blocks(self, hashes: Sequence[bytes]) -> int:
        """The longest leading run of ``hashes`` any engine of the fleet has cached."""
        best = 0
        for server in self.servers:
            n = server.engine.cache.cached_prefix_blocks(hashes)
            if n > best:
                best = n
                if best == len(hashes):
                    break
        return best

    # -- figures -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        engines = []
        totals: dict[str, float] = {
            "prompt_tokens": 0,
            "computed_prompt_tokens": 0,
            "hit_tokens": 0,
            "oracle_hit_tokens": 0,
            "queried_tokens": 0,
            "requests": 0,
            "prefill_requests": 0,
            "prompt_compute_ms": 0.0,
        }
        for server in self.servers:
            e = server.engine
            row: dict[str, object] = {
                "engine_id": e.config.engine_id,
                "url": server.url,
                "requests": e.stats.requests_total,
                "prefill_requests": e.stats.requests_by_role.get("prefill", 0),
                "prompt_tokens": e.prompt_tokens_total,
                "computed_prompt_tokens": e.computed_queries_tokens,
                "hit_tokens": e.cache.hits_tokens,
                "queried_tokens": e.cache.queries_tokens,
                "oracle_hit_tokens": e.oracle_hit_tokens,
                "prompt_compute_ms": e.prompt_compute_ms,
                "running": e.running,
                "waiting": e.waiting,
                "kv_usage": e.cache.usage,
            }
            engines.append(row)
            for key in totals:
                value = row[key]
                assert isinstance(value, int | float)
                totals[key] += value
        return {"totals": totals, "engines": engines}

    def reset(self) -> None:
        """Empty every prefix cache and zero the counters the fleet reports."""
        for server in self.servers:
            e = server.engine
            e.cache.reset()
            e.cache.hits_tokens = e.cache.queries_tokens = 0
            e.prompt_tokens_total = e.computed_queries_tokens = e.oracle_hit_tokens = 0
            e.prompt_compute_ms = 0.0
            e.stats.requests_total = 0
            e.stats.requests_by_role.clear()

    def manifest(self) -> dict[str, Any]:
        return {
            "engines": [
                {
                    "name": f"engine-{i}",
                    "host": s.config.host,
                    "port": s.port,
                    "kv_events_port": s.engine.kv_events.port if s.engine.kv_events else None,
                }
                for i, s in enumerate(self.servers)
            ],
            "control_port": self.control_port,
        }

    # -- lifetime ----------------------------------------------------------------------
    async def start(self) -> Fleet:
        try:
            for server in self.servers:
                await server.start()
            if self.options.control_port is not None:
                await self._start_control(self.options.control_port)
        except BaseException:
            await self.stop()
            raise
        if self.options.manifest:
            path = Path(self.options.manifest)
            partial = path.with_suffix(".partial")
            partial.write_text(json.dumps(self.manifest(), indent=1))
            partial.replace(path)
        return self

    async def _start_control(self, port: int) -> None:
        app = web.Application()

        async def stats(request: web.Request) -> web.Response:
            return web.json_response(self.stats())

        async def reset(request: web.Request) -> web.Response:
            self.reset()
            return web.json_response({"reset": len(self.servers)})

        app.router.add_get("/fleet/stats", stats)
        app.router.add_post("/fleet/reset", reset)
        self._control = web.AppRunner(app, access_log=None)
        await self._control.setup()
        site = web.TCPSite(self._control, self.base.host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.control_port = int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self) -> None:
        if self._control is not None:
            with contextlib.suppress(Exception):
                await self._control.cleanup()
        for server in self.servers:
            await server.stop()

    async def __aenter__(self) -> Fleet:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
