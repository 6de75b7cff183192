"""A deterministic DecisionMaker and an ext_proc client speaking Envoy's own messages."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from epp.decision import Decision, SchedulingError
from epp.extproc import EXTPROC_METHOD

if TYPE_CHECKING:
    from envoy.config.core.v3 import base_pb2


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    subset: list[str] | None


@dataclass
class FakeDecisionMaker:
    """Returns a fixed decision (or raises a fixed error) and records every call."""

    decode: str = "10.0.0.1:8000"
    prefill: str | None = None
    encoders: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    error: Exception | None = None
    # When set, decide() waits on it first (to hold a decision open).
    gate: asyncio.Event | None = None
    ready: bool = True
    calls: list[Call] = field(default_factory=list)
    decided: int = 0
    prefill_released: int = 0
    # First-token reports, with how many decisions had then finished.
    first_tokens: list[int] = field(default_factory=list)
    finished: int = 0
    finished_event: asyncio.Event = field(default_factory=asyncio.Event)
    # Served-endpoint reports that moved a decision, with how many prefills were then
    # released (a report must land before the prefill's release).
    reassigned: list[tuple[str, int]] = field(default_factory=list)

    def is_ready(self) -> bool:
        return self.ready

    async def decide(
        self,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        subset: Sequence[str] | None,
        *,
        headers_only: bool = False,
    ) -> Decision:
        self.calls.append(Call(path, dict(headers), body, None if subset is None else list(subset)))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        decode = self.decode
        if subset is not None:
            if not subset:
                raise NoEndpointsInSubset("empty subset")
            decode = subset[0]
        self.decided += 1
        return Decision(
            decode=decode,
            prefill=self.prefill,
            encoders=list(self.encoders),
            decision_type="prefill-decode" if self.prefill else "decode-only",
            decode_fallbacks=list(self.fallbacks),
            release_prefill=self._release_prefill,
            release_all=self._release_all,
            release_first_token=self._first_token,
            reassign=self._reassign,
        )

    async def settle(self, timeout_s: float = 10.0) -> None:
        """Wait until every decision handed out was released (its stream ended)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.finished != self.decided:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{self.decided - self.finished} decisions never released")
            await asyncio.sleep(0.01)  # polling a condition with a deadline

    def _reassign(self, served: str) -> None:
        self.reassigned.append((served, self.prefill_released))

    def _first_token(self) -> None:
        self.first_tokens.append(self.finished)

    def _release_prefill(self) -> None:
        self.prefill_released += 1

    def _release_all(self) -> None:
        self.finished += 1
        self.finished_event.set()


class NoEndpointsInSubset(SchedulingError):
    status = 503
    reason = "no_endpoints"


# ---- Envoy's side of the stream, built from xds-protos messages ----

SERVED_KEY = "x-gateway-destination-endpoint-served"


def header_map(pairs: Sequence[tuple[str, str]]) -> base_pb2.HeaderMap:
    from envoy.config.core.v3 import base_pb2

    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
    )


def request_headers(
    path: str = "/v1/completions",
    extra: Sequence[tuple[str, str]] = (),
    *,
    end_of_stream: bool = False,
    request_mode: str = "FULL_DUPLEX_STREAMED",
    response_mode: str = "FULL_DUPLEX_STREAMED",
    subset: list[str] | None = None,
) -> ep.ProcessingRequest:
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm

    pairs = [
        (":method", "POST"),
        (":path", path),
        (":authority", "gateway"),
        ("content-type", "application/json"),
        ("x-request-id", "req-1"),
        *extra,
    ]
    msg = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=header_map(pairs), end_of_stream=end_of_stream),
        protocol_config=ep.ProtocolConfiguration(
            request_body_mode=pm.ProcessingMode.BodySendMode.Value(request_mode),
            response_body_mode=pm.ProcessingMode.BodySendMode.Value(response_mode),
        ),
    )
    if subset is not None:
        msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].update(
            {"x-gateway-destination-endpoint-subset": subset}
        )
    return msg


def request_body(body: bytes, *, end_of_stream: bool) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=end_of_stream))


def response_headers(
    *, end_of_stream: bool = False, served: str | list[str] | None = None
) -> ep.ProcessingRequest:
    """``served``: the gateway's report of the endpoint that served the request."""
    msg = ep.ProcessingRequest(
        response_headers=ep.HttpHeaders(
            headers=header_map([(":status", "200")]), end_of_stream=end_of_stream
        )
    )
    if served is not None:
        msg.metadata_context.filter_metadata["envoy.lb"].update(
            {"x-gateway-destination-endpoint": "10.0.0.1:8000", SERVED_KEY: served}
        )
    return msg


def response_body(body: bytes, *, end_of_stream: bool) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=end_of_stream))


class ExtProcClient:
    """One ext_proc stream, as Envoy would drive it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        method = channel.stream_stream(
            EXTPROC_METHOD,
            request_serializer=ep.ProcessingRequest.SerializeToString,
            response_deserializer=ep.ProcessingResponse.FromString,
        )
        self.call = method()

    async def send(self, *messages: ep.ProcessingRequest) -> None:
        for message in messages:
            await self.call.write(message)

    async def recv(self) -> ep.ProcessingResponse:
        response = await asyncio.wait_for(self.call.read(), timeout=10)
        assert response is not grpc.aio.EOF, "the server ended the stream"
        assert isinstance(response, ep.ProcessingResponse)
        return response

    async def expect_end(self) -> None:
        response = await asyncio.wait_for(self.call.read(), timeout=10)
        assert response is grpc.aio.EOF, f"expected the end of the stream, got {response}"

    async def close(self) -> None:
        await self.call.done_writing()
