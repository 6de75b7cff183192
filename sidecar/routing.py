"""Routing headers: their names, and parsing of ``host:port`` lists.

The EPP writes these headers; a client must never choose a target, so every one of them
is removed before anything is forwarded, on every path.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from sidecar.errors import InvalidRoutingHeader

__all__ = [
    "DATA_PARALLEL_HOST_PORT",
    "DATA_PARALLEL_RANK",
    "DESTINATION_ENDPOINT",
    "ENCODER_HOSTS_PORTS",
    "KV_CACHE_SOURCE_HOST_PORT",
    "PREFILLER_HOST_PORT",
    "ROUTING_HEADERS",
    "HostPort",
    "parse_host_ports",
    "pick",
]

PREFILLER_HOST_PORT = "x-prefiller-host-port"
ENCODER_HOSTS_PORTS = "x-encoder-hosts-ports"
DESTINATION_ENDPOINT = "x-gateway-destination-endpoint"
KV_CACHE_SOURCE_HOST_PORT = "x-kv-cache-source-host-port"
DATA_PARALLEL_HOST_PORT = "x-data-parallel-host-port"
DATA_PARALLEL_RANK = "x-data-parallel-rank"

ROUTING_HEADERS: frozenset[str] = frozenset(
    {
        PREFILLER_HOST_PORT,
        ENCODER_HOSTS_PORTS,
        DESTINATION_ENDPOINT,
        KV_CACHE_SOURCE_HOST_PORT,
        DATA_PARALLEL_HOST_PORT,
        DATA_PARALLEL_RANK,
    }
)


@dataclass(frozen=True, slots=True)
class HostPort:
    """One upstream target. ``host`` is bare (no brackets, even for IPv6)."""

    host: str
    port: int

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.authority}"

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
        # An unbracketed IPv6 literal is ambiguous; refuse rather than guess.
        if not sep or not host or ":" in host or "/" in host or " " in host:
            raise InvalidRoutingHeader(header, entry)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidRoutingHeader(header, entry)
    return HostPort(host, int(port_text))


def parse_host_ports(value: str, header: str = PREFILLER_HOST_PORT) -> list[HostPort]:
    """Parse a comma list of targets; empty entries are ignored, anything else must parse."""
    targets = [_parse_one(part, header) for part in value.split(",") if part.strip()]
    if not targets:
        raise InvalidRoutingHeader(header, value)
    return targets


def pick(targets: list[HostPort], sample: bool) -> int:
    """Index of the first target to try: the first one, or a random one when sampling."""
    return random.randrange(len(targets)) if sample and len(targets) > 1 else 0
