"""The subscriptions of all engines: one subscriber task per endpoint, kept in step
with discovery (new endpoints subscribed, departed ones cancelled and purged)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import zmq.asyncio

from epp.datastore import Endpoint, format_host_port
from epp.kv_events.index import KvBlockIndex
from epp.kv_events.subscriber import EngineSubscriber, StreamCounters

__all__ = ["KvEventsPool"]

log = logging.getLogger(__name__)


class KvEventsPool:
    def __init__(
        self,
        index: KvBlockIndex,
        *,
        port: int,
        replay_port: int | None = None,
        topic_filter: str = "",
        replay_timeout_s: float = 2.0,
        endpoint_template: str = "tcp://{host}:{port}",
    ) -> None:
        self.index = index
        self.counters = StreamCounters()
        self._port = port
        self._replay_port = replay_port
        self._topic = topic_filter.encode("utf-8")
        self._replay_timeout = replay_timeout_s
        self._template = endpoint_template
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Cancelled but maybe not finished: their sockets must close before the context.
        self._stopping: set[asyncio.Task[None]] = set()

    def subscriber_for(self, ep: Endpoint) -> EngineSubscriber:
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        replay = None
        if self._replay_port is not None:
            replay = self.endpoint(ep, self._replay_port)
        return EngineSubscriber(
            self._ctx,
            ep.key,
            self.endpoint(ep, self._port),
            replay,
            self._topic,
            self.index,
            self.counters,
            self._replay_timeout,
        )

    def endpoint(self, ep: Endpoint, port: int) -> str:
        """The ZMQ address of an engine's socket: ``{host}`` (bracketed for IPv6),
        ``{port}`` and ``{name}`` (the pod) are filled in."""
        host = format_host_port(ep.address, port).rsplit(":", 1)[0]
        return self._template.format(host=host, port=port, name=ep.name)

    def sync(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """Follow a membership change (called on the event loop)."""
        for ep in removed:
            task = self._tasks.pop(ep.key, None)
            if task is not None:
                task.cancel()
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
            self.index.drop_engine(ep.key)
        for ep in added:
            if ep.key in self._tasks:
                continue
            sub = self.subscriber_for(ep)
            self._tasks[ep.key] = asyncio.get_running_loop().create_task(
                self._run(sub), name=f"kv events {ep.key}"
            )

    async def _run(self, sub: EngineSubscriber) -> None:
        try:
            await sub.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug here must not take routing down: the engine falls back to approximate.
            log.exception("kv events subscriber for %s failed", sub.engine)
            self.index.drop_engine(sub.engine)

    def subscribed(self) -> list[str]:
        return list(self._tasks)

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._stopping]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
