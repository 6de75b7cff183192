"""The route decision, without sockets: sidecar.plan.plan and on_prefill_failure."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.connectors import LegOrder
from sidecar.errors import InvalidRoutingHeader
from sidecar.plan import Failure, Route, on_prefill_failure, plan
from sidecar.routing import ENCODER_HOSTS_PORTS, PREFILLER_HOST_PORT, HostPort

P1, P2 = HostPort("10.0.0.1", 8000), HostPort("10.0.0.2", 8000)
E1 = HostPort("10.0.1.1", 9000)


def decide(
    prefill: str | None,
    encoders: str | None = None,
    *,
    order: LegOrder = LegOrder.SEQUENTIAL,
    decode_first: bool = False,
    encode_stage: bool = False,
    sampling: bool = False,
) -> Any:
    return plan(
        prefill,
        encoders,
        order=order,
        decode_first=decode_first,
        encode_stage=encode_stage,
        sampling=sampling,
    )


def test_no_routing_header_is_local() -> None:
    route = decide(None)
    assert route.route is Route.LOCAL
    assert route.mode == "local"
    assert route.prefillers == ()


def test_encoders_without_an_encode_stage_are_ignored() -> None:
    assert decide(None, "10.0.1.1:9000").route is Route.LOCAL
    assert decide("10.0.0.1:8000", "not a target").encoders is None


def test_encoders_alone_are_encode_then_decode() -> None:
    route = decide(None, "10.0.1.1:9000", encode_stage=True)
    assert route.route is Route.ENCODE
    assert route.mode == "epd"
    assert route.encoders == (E1,)
    # An empty encoder header is no request for an encode stage.
    assert decide(None, "", encode_stage=True).route is Route.LOCAL


@pytest.mark.parametrize(
    ("order", "decode_first", "expected"),
    [
        (LegOrder.SEQUENTIAL, False, Route.SEQUENTIAL),
        (LegOrder.SEQUENTIAL, True, Route.DECODE_FIRST),
        (LegOrder.CONCURRENT, False, Route.CONCURRENT),
        (LegOrder.CONCURRENT, True, Route.CONCURRENT),
    ],
)
def test_prefill_route_follows_the_connector(
    order: LegOrder, decode_first: bool, expected: Route
) -> None:
    route = decide("10.0.0.1:8000", order=order, decode_first=decode_first)
    assert route.route is expected
    assert route.mode == "pd"
    assert route.prefillers == (P1,)


def test_prefill_with_encoders_runs_both() -> None:
    route = decide("10.0.0.1:8000", "10.0.1.1:9000", encode_stage=True)
    assert route.route is Route.SEQUENTIAL
    assert route.encoders == (E1,)


def test_attempts_walk_the_prefiller_list_from_the_first() -> None:
    route = decide("10.0.0.1:8000,10.0.0.2:8000")
    assert route.first == 0
    assert [route.prefiller(n) for n in range(3)] == [P1, P2, P1]


def test_sampling_can_start_anywhere() -> None:
    firsts = {decide("10.0.0.1:8000,10.0.0.2:8000", sampling=True).first for _ in range(200)}
    assert firsts == {0, 1}


@pytest.mark.parametrize(
    ("prefill", "encoders", "header"),
    [
        ("no-port", None, PREFILLER_HOST_PORT),
        ("10.0.0.1:8000", "bad host:1", ENCODER_HOSTS_PORTS),
        (None, "10.0.1.1:0", ENCODER_HOSTS_PORTS),
        # A malformed prefill header is reported first.
        ("no-port", "bad host:1", PREFILLER_HOST_PORT),
    ],
)
def test_malformed_headers_are_refused(
    prefill: str | None, encoders: str | None, header: str
) -> None:
    with pytest.raises(InvalidRoutingHeader) as raised:
        decide(prefill, encoders, encode_stage=True)
    assert header in raised.value.message


@pytest.mark.parametrize(
    ("fallback", "rejected", "extra", "declined", "expected"),
    [
        ("error", False, False, False, Failure.ERROR),
        ("error", False, True, True, Failure.ERROR),
        ("local", True, False, False, Failure.ERROR),  # a 4xx is the client's answer
        ("local", False, False, False, Failure.LOCAL_AS_SENT),
        ("local", False, True, False, Failure.LOCAL_REBUILT),
        ("local", False, False, True, Failure.LOCAL_REBUILT),
    ],
)
def test_failed_prefill(
    fallback: Any, rejected: bool, extra: bool, declined: bool, expected: Failure
) -> None:
    outcome = on_prefill_failure(fallback, rejected=rejected, extra=extra, declined=declined)
    assert outcome is expected
