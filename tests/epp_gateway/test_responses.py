"""The pure message builders: chunking, response chunks and the routing mutation."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from epp._proto.disagg_extproc_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    ProcessingResponse,
    StreamedBodyResponse,
)
from epp.decision import Decision
from epp.extproc import MAX_CHUNK_BYTES, ROUTING_HEADERS
from epp.extproc.headers import GATEWAY_HEADERS
from epp.extproc.responses import (
    destination_value,
    routing_mutation,
    streamed_request_body,
    streamed_response_body,
    streamed_response_chunk,
)


@given(
    body=st.binary(max_size=3 * 1024),
    chunk=st.integers(min_value=1, max_value=512),
    end=st.booleans(),
)
def test_chunks_reassemble_and_respect_the_limit(body: bytes, chunk: int, end: bool) -> None:
    messages = streamed_request_body(body, end_of_stream=end, chunk_bytes=chunk)
    parts = [m.request_body.response.body_mutation.streamed_response for m in messages]
    assert b"".join(p.body for p in parts) == body
    assert all(len(p.body) <= chunk for p in parts)
    assert [p.end_of_stream for p in parts] == [False] * (len(parts) - 1) + [end]
    assert len(parts) == max(1, -(-len(body) // chunk))


def test_a_200kb_body_uses_62kb_chunks() -> None:
    body = bytes(200 * 1024)
    messages = streamed_request_body(body, end_of_stream=True, chunk_bytes=MAX_CHUNK_BYTES)
    sizes = [len(m.request_body.response.body_mutation.streamed_response.body) for m in messages]
    assert sizes == [MAX_CHUNK_BYTES] * 3 + [200 * 1024 - 3 * MAX_CHUNK_BYTES]


@given(body=st.binary(max_size=2048), end=st.booleans())
def test_a_response_chunk_is_the_same_message_on_the_wire(body: bytes, end: bool) -> None:
    # Built field by field; it must be exactly the nested message, down to an empty body
    # without end_of_stream (which still carries the streamed_response mutation).
    nested = ProcessingResponse(
        response_body=BodyResponse(
            response=CommonResponse(
                body_mutation=BodyMutation(
                    streamed_response=StreamedBodyResponse(body=body, end_of_stream=end)
                )
            )
        )
    )
    built = streamed_response_chunk(body, end)
    assert built == nested
    assert built.SerializeToString() == nested.SerializeToString()
    assert built.response_body.response.body_mutation.HasField("streamed_response")
    (one,) = streamed_response_body(body, end_of_stream=end, chunk_bytes=MAX_CHUNK_BYTES)
    assert one == nested


def test_a_response_chunk_above_the_limit_is_split() -> None:
    body = bytes(range(256)) * 3
    messages = streamed_response_body(body, end_of_stream=True, chunk_bytes=300)
    parts = [m.response_body.response.body_mutation.streamed_response for m in messages]
    assert [len(p.body) for p in parts] == [300, 300, 168]
    assert b"".join(p.body for p in parts) == body
    assert [p.end_of_stream for p in parts] == [False, False, True]


@given(
    prefill=st.one_of(st.none(), st.just("10.0.0.2:8000")),
    encoders=st.lists(st.sampled_from(["10.0.0.3:8000", "[fd00::3]:8000"]), max_size=2),
    fallbacks=st.lists(st.sampled_from(["10.0.0.4:8000", "[fd00::4]:8000"]), max_size=2),
    body_length=st.one_of(st.none(), st.integers(min_value=0, max_value=1 << 40)),
)
def test_every_routing_and_gateway_header_is_either_set_or_removed(
    prefill: str | None, encoders: list[str], fallbacks: list[str], body_length: int | None
) -> None:
    decision = Decision(
        decode="10.0.0.1:8000", prefill=prefill, encoders=encoders, decode_fallbacks=fallbacks
    )
    mutation = routing_mutation(decision, body_length)
    values = {o.header.key: o.header.raw_value.decode() for o in mutation.set_headers}
    removed = list(mutation.remove_headers)
    owned = [name for name in values if name != "content-length"]
    assert sorted(owned + removed) == sorted({*ROUTING_HEADERS, *GATEWAY_HEADERS})
    assert ("x-prefiller-host-port" in values) == (prefill is not None)
    assert ("x-encoder-hosts-ports" in values) == bool(encoders)
    assert values.get("content-length") == (None if body_length is None else str(body_length))
    assert values["x-gateway-destination-endpoint"] == destination_value(decision)
    assert destination_value(decision) == ",".join(["10.0.0.1:8000", *fallbacks])


def test_client_copies_of_the_gateway_reports_are_removed() -> None:
    mutation = routing_mutation(Decision(decode="10.0.0.1:8000"))
    for name in (
        "x-gateway-destination-endpoint-served",
        "x-gateway-destination-endpoint-subset",
        "x-llm-d-request-dropped-reason",
    ):
        assert name in mutation.remove_headers
