"""An evicted request's ext_proc stream: the immediate response is injected into the
live stream, whatever message the gateway is due to send next."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from epp.decision import Decision
from epp.flowcontrol.eviction import EVICTED_REASON, EvictionItem
from tests.epp_gateway.fakes import (
    request_body,
    request_headers,
    response_body,
    response_headers,
)

if TYPE_CHECKING:
    from tests.epp_gateway.conftest import ExtProcHarness


def _evictable(extproc: ExtProcHarness) -> EvictionItem:
    """Every decision the fake hands out carries this eviction handle."""
    item = EvictionItem("r1", -1, extproc.fake.decode)
    decide = extproc.fake.decide

    async def with_eviction(*args: Any, **kwargs: Any) -> Decision:
        decision = await decide(*args, **kwargs)
        decision.eviction = item
        return decision

    extproc.fake.decide = with_eviction  # type: ignore[method-assign]
    return item


def _header(response: Any, name: str) -> str | None:
    for option in response.immediate_response.headers.set_headers:
        if option.header.key == name:
            return str(option.header.raw_value.decode())
    return None


async def test_eviction_while_waiting_for_the_response_ends_with_429(
    extproc: ExtProcHarness,
) -> None:
    item = _evictable(extproc)
    client = extproc.client()
    await client.send(request_headers(), request_body(b"{}", end_of_stream=True))
    await client.recv()
    await client.recv()
    item.reason = EVICTED_REASON
    item.signal.set()
    answer = await client.recv()
    assert answer.WhichOneof("response") == "immediate_response"
    assert answer.immediate_response.status.code == 429
    assert _header(answer, "x-llm-d-request-dropped-reason") == "evicted"
    await client.expect_end()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 5)
    assert extproc.fake.finished == 1


async def test_a_signal_after_the_response_ended_is_ignored(extproc: ExtProcHarness) -> None:
    item = _evictable(extproc)
    client = extproc.client()
    await client.send(request_headers(), request_body(b"{}", end_of_stream=True))
    await client.recv()
    await client.recv()
    await client.send(response_headers())
    assert (await client.recv()).WhichOneof("response") == "response_headers"
    await client.send(response_body(b"done", end_of_stream=True))
    assert (await client.recv()).WhichOneof("response") == "response_body"
    item.signal.set()
    await client.close()
    await client.expect_end()
    assert extproc.fake.finished == 1


async def test_unevicted_stream_flows_normally_and_cancels_cleanly(
    extproc: ExtProcHarness,
) -> None:
    item = _evictable(extproc)
    client = extproc.client()
    await client.send(request_headers(), request_body(b"{}", end_of_stream=True))
    await client.recv()
    await client.recv()
    await client.send(response_headers())
    assert (await client.recv()).WhichOneof("response") == "response_headers"
    client.call.cancel()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 5)
    assert not item.signal.is_set()
