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


async def _routed(client: Any) -> None:
    """The request sent and routed (headers and body answered)."""
    await client.send(request_headers(), request_body(b"{}", end_of_stream=True))
    await client.recv()
    await client.recv()


async def _response_started(client: Any) -> None:
    """Routed, and the response's headers answered."""
    await _routed(client)
    await client.send(response_headers())
    assert (await client.recv()).WhichOneof("response") == "response_headers"


async def test_eviction_while_waiting_for_the_response_ends_with_429(
    extproc: ExtProcHarness,
) -> None:
    item = _evictable(extproc)
    client = extproc.client()
    await _routed(client)
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
    await _response_started(client)
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
    await _response_started(client)
    client.call.cancel()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 5)
    assert not item.signal.is_set()
    assert extproc.errors(429) == 0  # the reset was not taken for an eviction


async def test_eviction_in_the_middle_of_a_streamed_response_ends_with_429(
    extproc: ExtProcHarness,
) -> None:
    item = _evictable(extproc)
    client = extproc.client()
    await _response_started(client)
    for i in range(5):
        chunk = f"data: {i}\n\n".encode()
        await client.send(response_body(chunk, end_of_stream=False))
        answer = await client.recv()
        assert answer.response_body.response.body_mutation.streamed_response.body == chunk
    item.signal.set()  # the EPP is waiting for the next chunk
    answer = await client.recv()
    assert answer.immediate_response.status.code == 429
    assert _header(answer, "x-llm-d-request-dropped-reason") == "evicted"
    await client.expect_end()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 5)
    assert extproc.fake.finished == 1
    assert extproc.errors(429) == 1


async def test_a_signal_raised_while_a_chunk_is_handled_evicts_at_the_next_read(
    extproc: ExtProcHarness,
) -> None:
    item = _evictable(extproc)
    decide = extproc.fake.decide

    async def with_hook(*args: Any, **kwargs: Any) -> Decision:
        decision = await decide(*args, **kwargs)
        # A response-body plugin runs while the EPP is not reading: the signal set
        # there must still end the stream, after this chunk's answer.
        decision.response_body_hook = lambda _end: item.signal.set()
        return decision

    extproc.fake.decide = with_hook  # type: ignore[method-assign]
    client = extproc.client()
    await _response_started(client)
    await client.send(response_body(b"data: 0\n\n", end_of_stream=False))
    answer = await client.recv()
    assert answer.response_body.response.body_mutation.streamed_response.body == b"data: 0\n\n"
    answer = await client.recv()
    assert answer.immediate_response.status.code == 429
    await client.expect_end()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 5)
    assert extproc.fake.finished == 1
