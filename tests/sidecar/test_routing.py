"""Routing header parsing: lists, whitespace, http:// prefix, bracketed IPv6."""

from __future__ import annotations

import pytest

from sidecar.errors import InvalidRoutingHeader
from sidecar.routing import HostPort, parse_host_ports, pick


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.1:8000", [HostPort("10.0.0.1", 8000)]),
        (" prefill-0.svc:8000 ", [HostPort("prefill-0.svc", 8000)]),
        ("http://10.0.0.1:8000", [HostPort("10.0.0.1", 8000)]),
        ("HTTP://10.0.0.1:8000/", [HostPort("10.0.0.1", 8000)]),
        ("[::1]:8000", [HostPort("::1", 8000)]),
        ("http://[fd00::5]:9", [HostPort("fd00::5", 9)]),
        (
            "10.0.0.1:1, [fe80::1]:2 ,host:3,",
            [HostPort("10.0.0.1", 1), HostPort("fe80::1", 2), HostPort("host", 3)],
        ),
    ],
)
def test_parse(value: str, expected: list[HostPort]) -> None:
    assert parse_host_ports(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", " , ", "10.0.0.1", "10.0.0.1:", "host:0", "host:65536", "host:http", "::1:8000",
     "[::1]8000", "[nothost]:80", "https//x:1", "a b:1", "10.0.0.1:80, bad"],
)  # fmt: skip
def test_unparsable(value: str) -> None:
    with pytest.raises(InvalidRoutingHeader):
        parse_host_ports(value)


def test_authority_brackets_ipv6() -> None:
    assert HostPort("::1", 80).authority == "[::1]:80"
    assert HostPort("::1", 80).base_url == "http://[::1]:80"
    assert HostPort("h", 80).authority == "h:80"


def test_pick_first_or_sampled() -> None:
    targets = [HostPort("a", 1), HostPort("b", 2), HostPort("c", 3)]
    assert {pick(targets, sample=False) for _ in range(50)} == {0}
    assert {pick(targets, sample=True) for _ in range(300)} == {0, 1, 2}
    assert pick(targets[:1], sample=True) == 0
