"""Routing headers: their names, and parsing of ``host:port`` lists.

The EPP writes these headers; a client must never choose a target, so every one of them
is removed before anything is forwarded, on every path.
"""

from __future__ import annotations

import ipaddress
import random
import re
from dataclasses import dataclass, field

from common import routing_headers
from common.routing_headers import (
    DATA_PARALLEL_HOST_PORT,
    DATA_PARALLEL_RANK,
    DESTINATION_ENDPOINT,
    ENCODER_HOSTS_PORTS,
    KV_CACHE_SOURCE_HOST_PORT,
    PREFILLER_HOST_PORT,
)
from sidecar.errors import InvalidRoutingHeader

__all__ = [
    "DATA_PARALLEL_HOST_PORT",
    "DATA_PARALLEL_RANK",
    "DESTINATION_ENDPOINT",
    "ENCODER_HOSTS_PORTS",
    "KV_CACHE_SOURCE_HOST_PORT",
    "MAX_TARGETS",
    "PREFILLER_HOST_PORT",
    "ROUTING_HEADERS",
    "HostPort",
    "parse_host_ports",
    "pick",
]

ROUTING_HEADERS: frozenset[str] = frozenset(routing_headers.ROUTING_HEADERS)

# More targets than any pool hands out in one header; past it the header is refused
# (the EPP names one prefiller and a few encoders).
MAX_TARGETS = 256
# A DNS name (RFC 1123 labels; "_" as Kubernetes service records use it) or an IPv4
# literal. Anything else (userinfo "@", "?", "#", "%", "\\", tabs, empty labels, non-ASCII)
# would make the URL aim somewhere other than what was checked, or fail inside the client.
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?",
    re.ASCII,
)


@dataclass(frozen=True, slots=True)
class HostPort:
    """One upstream target. ``host`` is bare (no brackets, even for IPv6)."""

    host: str
    port: int
    authority: str = field(init=False, compare=False, repr=False)  # host:port, [v6]:port
    base_url: str = field(init=False, compare=False, repr=False)  # http://authority

    def __post_init__(self) -> None:
        host, port = self.host, self.port
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        object.__setattr__(self, "authority", authority)
        object.__setattr__(self, "base_url", f"http://{authority}")

    def __str__(self) -> str:
        return self.authority


def _parse_one(entry: str, header: str) -> HostPort:
    text = entry.strip()
    if text.lower().startswith("http://"):
        text = text[len("http://") :]
    text = text.rstrip("/")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1 : close + 2] == ":":
            raise InvalidRoutingHeader(header, entry)
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidRoutingHeader(header, entry) from None
    else:
        host, sep, port_text = text.rpartition(":")
        # An unbracketed IPv6 literal is ambiguous (":" in host); refuse rather than guess.
        if not sep or _HOST_NAME.fullmatch(host) is None:
            raise InvalidRoutingHeader(header, entry)
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise InvalidRoutingHeader(header, entry)
    return HostPort(host, int(port_text))


# Parsed headers by (value, header name): the EPP names the same few targets over and
# over. Bounded: cleared when full (a value is cheap to parse again).
_PARSED: dict[tuple[str, str], tuple[HostPort, ...]] = {}
_PARSED_MAX = 4096


def parse_host_ports(value: str, header: str = PREFILLER_HOST_PORT) -> list[HostPort]:
    """Parse a comma list of targets; empty entries are ignored, anything else must parse."""
    key = (value, header)
    known = _PARSED.get(key)
    if known is not None:
        return list(known)
    targets = _parse_host_ports(value, header)
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.clear()
    _PARSED[key] = tuple(targets)
    return targets


def _parse_host_ports(value: str, header: str) -> list[HostPort]:
    parts = [part for part in value.split(",") if part.strip()]
    if len(parts) > MAX_TARGETS:
        raise InvalidRoutingHeader(header, value, f"{len(parts)} targets, at most {MAX_TARGETS}")
    targets = [_parse_one(part, header) for part in parts]
    if not targets:
        raise InvalidRoutingHeader(header, value)
    return targets


def pick(targets: list[HostPort], sample: bool) -> int:
    """Index of the first target to try: the first one, or a random one when sampling."""
    return random.randrange(len(targets)) if sample and len(targets) > 1 else 0
