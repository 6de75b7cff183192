"""``x-data-parallel-host-port``: the deprecated way an EPP names the data-parallel rank
that decodes a request.

The value is ``<this pod's address>:<a rank's sidecar port>`` (the EPP's data-parallel
profile handler writes the picked endpoint, whose port is one of the ports this sidecar
serves with ``--data-parallel-size``). The decode leg of a generation request (P/D, E/PD
or decode-only) then goes to that rank's local engine (``--model-server-port`` + r)
instead of the engine of the port the request arrived on. The prefill and encode legs
are not affected. A value that does not parse as one ``host:port``, or that names no
rank of this sidecar, is the client's error (400); with ``--enable-ssrf-protection`` the
value is checked against the pool first, like every other target (403).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from sidecar.errors import BadRequest, InvalidRoutingHeader
from sidecar.routing import DATA_PARALLEL_HOST_PORT, HostPort, parse_host_ports
from sidecar.ssrf.rules import normalize_host

__all__ = ["UnknownDataParallelRank", "local_hosts", "parse_rank_target", "rank_base_url"]

# Addresses that always mean this pod, besides its POD_IP and listen address.
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class UnknownDataParallelRank(BadRequest):
    def __init__(self, target: HostPort) -> None:
        super().__init__(
            f"header {DATA_PARALLEL_HOST_PORT}: {target.authority} is not a data-parallel"
            " rank of this sidecar"
        )


def parse_rank_target(value: str) -> HostPort:
    """The one ``host:port`` of the header; anything else is an invalid routing header."""
    targets = parse_host_ports(value, DATA_PARALLEL_HOST_PORT)
    if len(targets) != 1:
        raise InvalidRoutingHeader(DATA_PARALLEL_HOST_PORT, value, "expected one host:port")
    return targets[0]


def rank_base_url(
    target: HostPort, rank_urls: Mapping[int, str], local_hosts: Collection[str]
) -> str:
    """The engine URL of the rank ``target`` names.

    ``rank_urls`` maps each rank's sidecar port (as bound) to its engine's base URL;
    ``local_hosts`` are the addresses of this pod (normalised), loopback included."""
    host = normalize_host(target.host)
    url = rank_urls.get(target.port)
    if url is None or (host not in local_hosts and host not in _LOOPBACK):
        raise UnknownDataParallelRank(target)
    return url


def local_hosts(*addresses: str) -> frozenset[str]:
    """This pod's addresses, normalised; empty and wildcard ones are left out."""
    return frozenset(normalize_host(a) for a in addresses if a and a not in ("0.0.0.0", "::"))
