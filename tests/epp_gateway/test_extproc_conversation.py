"""ext_proc conversations over loopback gRPC, driven with Envoy's own message types."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import TYPE_CHECKING

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from epp.decision import DROPPED_REASONS, BadRequest, InternalError, NoCapacity, NoEndpoints
from epp.extproc import MAX_CHUNK_BYTES, ROUTING_HEADERS, ExtProcConfig
from epp.extproc.headers import GATEWAY_HEADERS
from tests.epp_gateway.fakes import (
    request_body,
    request_headers,
    response_body,
    response_headers,
)

if TYPE_CHECKING:
    from tests.epp_gateway.conftest import ExtProcHarness, StartExtProc

SPOOFED = [(name, "6.6.6.6:666") for name in ROUTING_HEADERS]


def _set_headers(response: ep.CommonResponse) -> dict[str, str]:
    return {o.header.key: o.header.raw_value.decode() for o in response.header_mutation.set_headers}


def _split(body: bytes, sizes: list[int]) -> list[bytes]:
    chunks, start = [], 0
    for size in sizes:
        chunks.append(body[start : start + size])
        start += size
    chunks.append(body[start:])
    return chunks


def _body(size: int) -> bytes:
    rng = random.Random(size)
    prompt = "".join(rng.choice("abcdefgh ijk\u00e9\u4e2d") for _ in range(size))
    return json.dumps({"model": "m", "prompt": prompt}).encode()[:size]


CHUNKINGS = {
    "one-empty-final": (300, [300]),
    "bytes": (17, [1] * 16),
    "odd": (200_003, [1, 7, 65_537, 3, 4096, 62 * 1024 + 1]),
    "exact-chunk": (2 * MAX_CHUNK_BYTES, [MAX_CHUNK_BYTES]),
    "empty": (0, []),
}


@pytest.mark.parametrize("name", sorted(CHUNKINGS))
async def test_full_duplex_decides_after_last_chunk_and_reemits_body(
    extproc: ExtProcHarness, name: str
) -> None:
    size, sizes = CHUNKINGS[name]
    body = _body(size)
    extproc.fake.prefill = "10.0.0.9:8000"
    client = extproc.client()
    chunks = _split(body, sizes)
    await client.send(request_headers(extra=SPOOFED))
    for i, chunk in enumerate(chunks):
        await client.send(request_body(chunk, end_of_stream=i == len(chunks) - 1))

    first = await client.recv()
    assert first.WhichOneof("response") == "request_headers"
    common = first.request_headers.response
    assert common.clear_route_cache
    assert _set_headers(common) == {
        "x-gateway-destination-endpoint": "10.0.0.1:8000",
        "x-prefiller-host-port": "10.0.0.9:8000",
        # the re-sent body's own length, whatever framing the client used
        "content-length": str(len(body)),
    }
    assert all(
        o.append_action == o.OVERWRITE_IF_EXISTS_OR_ADD for o in common.header_mutation.set_headers
    )
    # every client copy of a routing or gateway header is gone: removed, or overwritten
    stripped = {*ROUTING_HEADERS, *GATEWAY_HEADERS}
    assert set(common.header_mutation.remove_headers) == stripped - {
        "x-gateway-destination-endpoint",
        "x-prefiller-host-port",
    }
    lb = first.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["x-gateway-destination-endpoint"].string_value == "10.0.0.1:8000"

    echoed = bytearray()
    while True:
        msg = await client.recv()
        assert msg.WhichOneof("response") == "request_body"
        streamed = msg.request_body.response.body_mutation.streamed_response
        assert len(streamed.body) <= MAX_CHUNK_BYTES
        echoed += streamed.body
        if streamed.end_of_stream:
            break
    assert bytes(echoed) == body

    [call] = extproc.fake.calls
    assert call.body == body
    assert call.path == "/v1/completions"
    assert call.headers["x-prefiller-host-port"] == "6.6.6.6:666"  # the scheduler sees it all
    assert call.subset is None
    await client.close()
    await client.expect_end()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 5)
    assert extproc.fake.finished == 1


async def test_decode_only_removes_every_routing_header(extproc: ExtProcHarness) -> None:
    client = extproc.client()
    await client.send(request_headers(extra=SPOOFED), request_body(b"{}", end_of_stream=True))
    first = await client.recv()
    common = first.request_headers.response
    assert _set_headers(common) == {
        "x-gateway-destination-endpoint": "10.0.0.1:8000",
        "content-length": "2",
    }
    stripped = {*ROUTING_HEADERS, *GATEWAY_HEADERS}
    assert set(common.header_mutation.remove_headers) == stripped - {
        "x-gateway-destination-endpoint"
    }
    await client.close()


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
async def test_header_and_metadata_carry_the_same_destination_list(
    extproc: ExtProcHarness, mode: str
) -> None:
    """The protocol forbids two different values: the fallbacks are in both."""
    extproc.fake.fallbacks = ["10.0.0.2:8000", "[fd00::3]:8000"]
    client = extproc.client()
    await client.send(request_headers(request_mode=mode), request_body(b"{}", end_of_stream=True))
    first = await client.recv()
    kind = "request_headers" if mode == "FULL_DUPLEX_STREAMED" else "request_body"
    if mode == "BUFFERED":
        assert first.WhichOneof("response") == "request_headers"  # the plain continue
        first = await client.recv()
    assert first.WhichOneof("response") == kind
    common = getattr(first, kind).response
    header = _set_headers(common)["x-gateway-destination-endpoint"]
    lb = first.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert header == lb["x-gateway-destination-endpoint"].string_value
    assert header == "10.0.0.1:8000,10.0.0.2:8000,[fd00::3]:8000"
    await client.close()


async def test_encoders_are_a_comma_list(extproc: ExtProcHarness) -> None:
    extproc.fake.encoders = ["10.0.0.5:8000", "[fd00::5]:8000"]
    client = extproc.client()
    await client.send(request_headers(), request_body(b"{}", end_of_stream=True))
    first = await client.recv()
    headers = _set_headers(first.request_headers.response)
    assert headers["x-encoder-hosts-ports"] == "10.0.0.5:8000,[fd00::5]:8000"
    await client.close()


@pytest.mark.parametrize("sizes", [[], [5], [70_000]])
async def test_buffered_mode_routes_in_the_body_answer(
    extproc: ExtProcHarness, sizes: list[int]
) -> None:
    body = _body(sum(sizes) + 11)
    client = extproc.client()
    await client.send(
        request_headers(extra=SPOOFED, request_mode="BUFFERED", response_mode="BUFFERED")
    )
    # Envoy waits for this answer before it sends the buffered body.
    first = await client.recv()
    assert first.WhichOneof("response") == "request_headers"
    assert not first.request_headers.response.HasField("header_mutation")
    assert not extproc.fake.calls

    await client.send(request_body(body, end_of_stream=True))
    second = await client.recv()
    assert second.WhichOneof("response") == "request_body"
    common = second.request_body.response
    assert common.clear_route_cache
    assert not common.HasField("body_mutation"), "a buffered body goes on untouched"
    assert _set_headers(common) == {"x-gateway-destination-endpoint": "10.0.0.1:8000"}
    assert "x-prefiller-host-port" in common.header_mutation.remove_headers
    assert (
        second.dynamic_metadata.fields["envoy.lb"]
        .struct_value.fields["x-gateway-destination-endpoint"]
        .string_value
        == "10.0.0.1:8000"
    )
    assert extproc.fake.calls[0].body == body

    # buffered response: empty answers let Envoy pass it on
    await client.send(response_headers(), response_body(b"whole", end_of_stream=True))
    assert (await client.recv()).WhichOneof("response") == "response_headers"
    answer = await client.recv()
    assert answer.WhichOneof("response") == "response_body"
    assert not answer.response_body.response.HasField("body_mutation")
    await client.close()
    await client.expect_end()


async def test_headers_only_request_is_decided_at_once(extproc: ExtProcHarness) -> None:
    client = extproc.client()
    await client.send(request_headers(path="/v1/models", end_of_stream=True))
    first = await client.recv()
    assert _set_headers(first.request_headers.response)["x-gateway-destination-endpoint"]
    assert extproc.fake.calls[0].body == b""
    assert extproc.fake.calls[0].path == "/v1/models"
    await client.close()


async def test_response_streams_through_chunk_by_chunk(extproc: ExtProcHarness) -> None:
    extproc.fake.prefill = "10.0.0.9:8000"
    client = extproc.client()
    await client.send(request_headers(), request_body(b"{}", end_of_stream=True))
    await client.recv()
    await client.recv()
    assert extproc.fake.prefill_released == 0

    await client.send(response_headers())
    assert (await client.recv()).WhichOneof("response") == "response_headers"
    assert extproc.fake.prefill_released == 1
    assert extproc.fake.finished == 0

    big = b"x" * (MAX_CHUNK_BYTES + 10)
    for i, event in enumerate([b"data: 1\n\n", big, b"data: [DONE]\n\n"]):
        last = i == 2
        await client.send(response_body(event, end_of_stream=last))
        got = bytearray()
        while True:
            answer = await client.recv()
            streamed = answer.response_body.response.body_mutation.streamed_response
            got += streamed.body
            if len(got) == len(event):
                break
        assert bytes(got) == event
        assert streamed.end_of_stream == last
    await client.send(
        ep.ProcessingRequest(response_trailers=ep.HttpTrailers()),
    )
    assert (await client.recv()).WhichOneof("response") == "response_trailers"
    await client.close()
    await client.expect_end()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 5)
    assert extproc.fake.finished == 1
    assert extproc.fake.prefill_released == 1


async def test_trailers_close_the_request_body(extproc: ExtProcHarness) -> None:
    client = extproc.client()
    await client.send(
        request_headers(),
        request_body(b'{"a":', end_of_stream=False),
        request_body(b"1}", end_of_stream=False),
        ep.ProcessingRequest(request_trailers=ep.HttpTrailers()),
    )
    kinds = []
    body = bytearray()
    for _ in range(3):
        msg = await client.recv()
        kinds.append(msg.WhichOneof("response"))
        if kinds[-1] == "request_body":
            streamed = msg.request_body.response.body_mutation.streamed_response
            body += streamed.body
            assert not streamed.end_of_stream
    assert kinds == ["request_headers", "request_body", "request_trailers"]
    assert bytes(body) == b'{"a":1}'
    assert extproc.fake.calls[0].body == b'{"a":1}'
    await client.close()


async def test_subset_hint_is_passed_to_the_scheduler(extproc: ExtProcHarness) -> None:
    client = extproc.client()
    await client.send(
        request_headers(subset=["10.0.0.7:8000", "10.0.0.8:8000"], end_of_stream=True)
    )
    first = await client.recv()
    assert _set_headers(first.request_headers.response) == {
        "x-gateway-destination-endpoint": "10.0.0.7:8000"
    }
    assert extproc.fake.calls[0].subset == ["10.0.0.7:8000", "10.0.0.8:8000"]
    await client.close()


async def test_empty_subset_hint_means_none_allowed(extproc: ExtProcHarness) -> None:
    client = extproc.client()
    await client.send(request_headers(subset=[], end_of_stream=True))
    first = await client.recv()
    assert first.immediate_response.status.code == 503
    assert extproc.fake.calls[0].subset == []


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (BadRequest("body is not JSON"), 400, "bad_request"),
        (NoCapacity("all pods saturated"), 429, "no_capacity"),
        (NoEndpoints("no endpoints known"), 503, "no_endpoints"),
        (InternalError("broken"), 500, "internal_error"),
        (RuntimeError("bug"), 500, "internal_error"),
    ],
)
async def test_refusals_end_with_a_json_immediate_response(
    extproc: ExtProcHarness, error: Exception, status: int, reason: str
) -> None:
    extproc.fake.error = error
    client = extproc.client()
    await client.send(request_headers(), request_body(b"{}", end_of_stream=True))
    msg = await client.recv()
    assert msg.WhichOneof("response") == "immediate_response"
    immediate = msg.immediate_response
    assert immediate.status.code == status
    assert immediate.details == reason
    headers = {o.header.key: o.header.raw_value.decode() for o in immediate.headers.set_headers}
    # llm-d's values where llm-d names the drop (rejected-saturated, -no-endpoints).
    dropped = DROPPED_REASONS.get(reason, reason)
    assert headers == {
        "content-type": "application/json",
        "x-llm-d-request-dropped-reason": dropped,
    }
    payload = json.loads(immediate.body)
    assert payload["error"]["type"] == reason
    assert payload["error"]["code"] == status
    if not isinstance(error, RuntimeError):
        assert payload["error"]["message"] == str(error)
    await client.expect_end()
    assert extproc.errors(status) == 1


async def test_body_over_the_limit_is_refused(start_extproc: StartExtProc) -> None:
    harness = await start_extproc(ExtProcConfig(max_body_bytes=1000))
    client = harness.client()
    await client.send(
        request_headers(),
        request_body(b"a" * 600, end_of_stream=False),
        request_body(b"a" * 600, end_of_stream=False),
    )
    msg = await client.recv()
    assert msg.immediate_response.status.code == 413
    assert not harness.fake.calls
    await client.expect_end()
    assert harness.errors(413) == 1


async def test_slow_decision_times_out(start_extproc: StartExtProc) -> None:
    harness = await start_extproc(ExtProcConfig(decision_timeout_s=0.05))
    harness.fake.gate = asyncio.Event()  # never set: the decision hangs
    client = harness.client()
    await client.send(request_headers(end_of_stream=True))
    msg = await client.recv()
    assert msg.immediate_response.status.code == 500
    assert msg.immediate_response.details == "decision_timeout"


async def test_unsupported_body_mode_is_refused(extproc: ExtProcHarness) -> None:
    client = extproc.client()
    await client.send(request_headers(request_mode="STREAMED"))
    msg = await client.recv()
    assert msg.immediate_response.status.code == 500
    assert msg.immediate_response.details == "unsupported_body_mode"


async def test_body_before_headers_aborts_the_stream(extproc: ExtProcHarness) -> None:
    client = extproc.client()
    await client.send(request_body(b"{}", end_of_stream=True))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "before request_headers" in (info.value.details() or "")


async def test_cancelled_stream_releases_the_decision(extproc: ExtProcHarness) -> None:
    client = extproc.client()
    await client.send(request_headers(end_of_stream=True))
    await client.recv()
    assert extproc.fake.finished == 0
    client.call.cancel()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 5)
    assert extproc.fake.finished == 1


async def test_many_concurrent_streams(extproc: ExtProcHarness) -> None:
    async def one(i: int) -> bytes:
        client = extproc.client()
        body = _body(1000 + i)
        await client.send(
            request_headers(),
            request_body(body[:333], end_of_stream=False),
            request_body(body[333:], end_of_stream=True),
        )
        await client.recv()
        echoed = (await client.recv()).request_body.response.body_mutation.streamed_response
        await client.close()
        await client.expect_end()
        return bytes(echoed.body) if echoed.body == body else b""

    results = await asyncio.gather(*(one(i) for i in range(40)))
    assert all(results)
    assert len(extproc.fake.calls) == 40


async def test_a_server_bug_costs_one_request_a_500(extproc: ExtProcHarness) -> None:
    extproc.fake.decode = None  # type: ignore[assignment]  # an invalid decision
    client = extproc.client()
    await client.send(request_headers(end_of_stream=True))
    msg = await client.recv()
    assert msg.immediate_response.status.code == 500
    assert extproc.errors(500) == 1
    await client.expect_end()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 30)


def _ended_early(extproc: ExtProcHarness, stage: str) -> float:
    value = extproc.metrics.registry.get_sample_value(
        "disagg_epp_extproc_streams_ended_early_total", {"stage": stage}
    )
    return value or 0.0


async def _open_streams_drop_to(extproc: ExtProcHarness, n: int) -> None:
    registry = extproc.metrics.registry
    deadline = asyncio.get_running_loop().time() + 30
    while registry.get_sample_value("llm_d_epp_extproc_streams_inflight") != n:
        assert asyncio.get_running_loop().time() < deadline, "ext_proc streams left open"
        await asyncio.sleep(0.01)  # polling a condition with a deadline


async def test_streams_the_gateway_ends_early_are_closed_and_counted(
    extproc: ExtProcHarness,
) -> None:
    half_closed = extproc.client()
    await half_closed.send(request_headers())
    await half_closed.close()
    await half_closed.expect_end()
    mid_body = extproc.client()
    await mid_body.send(request_headers(), request_body(b'{"mod', end_of_stream=False))
    routed = extproc.client()
    await routed.send(request_headers(end_of_stream=True))
    await routed.recv()
    await _open_streams_drop_to(extproc, 2)
    mid_body.call.cancel()
    routed.call.cancel()
    await _open_streams_drop_to(extproc, 0)
    assert _ended_early(extproc, "before_routing") == 2
    assert _ended_early(extproc, "after_routing") == 1
    await extproc.fake.settle()

    # A complete conversation, and a refused one, are not counted.
    done = extproc.client()
    await done.send(request_headers(end_of_stream=True))
    await done.recv()
    await done.send(response_headers(), response_body(b"{}", end_of_stream=True))
    await done.recv()
    await done.recv()
    await done.close()
    await done.expect_end()
    extproc.fake.error = BadRequest("no")
    refused = extproc.client()
    await refused.send(request_headers(end_of_stream=True))
    assert (await refused.recv()).immediate_response.status.code == 400
    await refused.expect_end()
    await _open_streams_drop_to(extproc, 0)
    assert _ended_early(extproc, "before_routing") == 2
    assert _ended_early(extproc, "after_routing") == 1


async def test_server_stop_ends_waiting_streams_cleanly(
    start_extproc: StartExtProc, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="epp.extproc")
    extproc = await start_extproc()
    waiting = extproc.client()
    await waiting.send(request_headers())  # the EPP now waits for the body
    await _open_streams_drop_to(extproc, 1)
    server = extproc.server
    await server.stop(grace=0.2)
    await _open_streams_drop_to(extproc, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize(
    ("served", "moved"),
    [
        ("10.0.0.2:8000", "10.0.0.2:8000"),
        (["10.0.0.3:8000"], "10.0.0.3:8000"),
        ("10.0.0.1:8000", None),  # the pick itself served it
        ("", None),
    ],
)
async def test_served_report_moves_the_decision_before_the_prefill_release(
    extproc: ExtProcHarness, served: str | list[str], moved: str | None
) -> None:
    extproc.fake.prefill = "10.0.0.9:8000"
    client = extproc.client()
    await client.send(request_headers(), request_body(b"{}", end_of_stream=True))
    await client.recv()
    await client.recv()
    await client.send(response_headers(served=served))
    assert (await client.recv()).WhichOneof("response") == "response_headers"
    # Reports on later messages do not count again.
    body = response_body(b"done", end_of_stream=True)
    body.metadata_context.filter_metadata["envoy.lb"].update(
        {"x-gateway-destination-endpoint-served": "10.0.0.4:8000"}
    )
    await client.send(body)
    await client.recv()
    await client.close()
    await client.expect_end()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 5)
    expected = [] if moved is None else [(moved, 0)]
    assert extproc.fake.reassigned == expected
    assert extproc.fake.prefill_released == 1


async def test_first_token_is_the_first_response_body_bytes(extproc: ExtProcHarness) -> None:
    client = extproc.client()
    await client.send(request_headers(), request_body(b"{}", end_of_stream=True))
    await client.recv()
    await client.recv()
    await client.send(response_headers())
    await client.recv()
    # Headers alone (an engine sends them before computing the prompt) are no token.
    assert extproc.fake.first_tokens == []
    await client.send(response_body(b"", end_of_stream=False))
    await client.recv()
    assert extproc.fake.first_tokens == []
    await client.send(response_body(b"data: {}\n\n", end_of_stream=False))
    await client.recv()
    assert extproc.fake.first_tokens == [0]  # before the request ended
    await client.send(response_body(b"data: [DONE]\n\n", end_of_stream=True))
    await client.recv()
    await client.close()
    await client.expect_end()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 5)
    assert extproc.fake.first_tokens == [0]  # once


async def test_a_response_without_body_reports_its_first_token_at_the_headers(
    extproc: ExtProcHarness,
) -> None:
    client = extproc.client()
    await client.send(request_headers(), request_body(b"{}", end_of_stream=True))
    await client.recv()
    await client.recv()
    await client.send(response_headers(end_of_stream=True))
    await client.recv()
    assert extproc.fake.first_tokens == [0]
    await client.close()
    await client.expect_end()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 5)
    assert extproc.fake.first_tokens == [0]


async def test_no_served_report_leaves_the_decision_alone(extproc: ExtProcHarness) -> None:
    client = extproc.client()
    await client.send(request_headers(), request_body(b"{}", end_of_stream=True))
    await client.recv()
    await client.recv()
    await client.send(response_headers(), response_body(b"x", end_of_stream=True))
    await client.recv()
    await client.recv()
    await client.close()
    await client.expect_end()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 5)
    assert extproc.fake.reassigned == []


async def test_a_failing_reassignment_does_not_break_the_stream(
    extproc: ExtProcHarness, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(_served: str) -> None:
        raise RuntimeError("tracker bug")

    extproc.fake._reassign = boom  # type: ignore[method-assign]
    client = extproc.client()
    await client.send(request_headers(), request_body(b"{}", end_of_stream=True))
    await client.recv()
    await client.recv()
    with caplog.at_level(logging.ERROR, logger="epp.extproc"):
        await client.send(response_headers(served="10.0.0.2:8000"))
        assert (await client.recv()).WhichOneof("response") == "response_headers"
    assert "request req-1: charging the served endpoint failed" in caplog.text
    await client.send(response_body(b"x", end_of_stream=True))
    assert (await client.recv()).WhichOneof("response") == "response_body"
    await client.close()
    await client.expect_end()
    await asyncio.wait_for(extproc.fake.finished_event.wait(), 5)
