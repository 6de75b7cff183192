"""Real ZeroMQ publishers (the simulator's) and subscribers on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from vllm_sim.kv_events import KvEventPublisher, block_stored

Until = Callable[[Callable[[], bool]], Awaitable[None]]


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def stored(*hashes: int) -> dict[str, Any]:
    return block_stored(list(hashes), None, [], 16)


@pytest.fixture
async def publisher() -> AsyncIterator[Callable[..., Awaitable[KvEventPublisher]]]:
    started: list[KvEventPublisher] = []

    async def start(replay: bool = True, **kw: Any) -> KvEventPublisher:
        pub = KvEventPublisher("127.0.0.1", 0, 0 if replay else None, "kv@pod@m", **kw)
        await pub.start()
        started.append(pub)
        return pub

    yield start
    for pub in started:
        await pub.close()
