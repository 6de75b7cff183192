"""Peer addresses of the MoRI-IO connector: DNS names resolved at start, refreshed on a TTL.

A literal IP is used as is. A name is resolved once at start-up (IPv4 preferred; a
failure stops start-up) and again, in the background, when a request finds its cached
address older than the TTL: the request gets the cached address at once, a failed lookup
keeps it, and one lookup per name runs at a time. A peer pod that restarts with a new IP
is thus picked up within about one TTL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable

__all__ = ["PeerResolver", "pick_address"]

log = logging.getLogger("sidecar.moriio")


def _nothing() -> None:
    return None


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def pick_address(infos: Iterable[tuple[object, ...]]) -> str:
    """The first IPv4 address of a ``getaddrinfo`` answer, else its first address."""
    addresses = [(info[0], str(info[4][0])) for info in infos if isinstance(info[4], tuple)]
    if not addresses:
        raise OSError("no address")
    for family, address in addresses:
        if family == socket.AF_INET:
            return address
    return addresses[0][1]


class PeerResolver:
    def __init__(
        self,
        ttl: float = 30.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self._clock = clock
        self._cache: dict[str, tuple[str, float]] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self.lookups = 0
        self.changes = 0
        self.failures = 0
        # Called per request-path lookup that succeeded, changed the address, failed.
        self.on_lookup: Callable[[], None] = _nothing
        self.on_change: Callable[[], None] = _nothing
        self.on_failure: Callable[[], None] = _nothing

    def seed(self, hosts: Iterable[str]) -> None:
        """Resolve every name now (start-up); raises ``ValueError`` naming one that fails."""
        for host in hosts:
            if not host or _is_literal(host) or host in self._cache:
                continue
            try:
                address = pick_address(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
            except OSError as exc:
                raise ValueError(f"cannot resolve {host!r}: {exc}") from None
            self._cache[host] = (address, self._clock())

    def current(self, host: str) -> str:
        """The address to use now; starts a background refresh when the entry is stale."""
        if not host or _is_literal(host):
            return host
        cached = self._cache.get(host)
        if cached is None or self._clock() - cached[1] >= self.ttl:
            self._refresh(host)
        return host if cached is None else cached[0]

    def _refresh(self, host: str) -> None:
        if host in self._refreshing:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._lookup(host))
        self._refreshing[host] = task
        task.add_done_callback(lambda _: self._refreshing.pop(host, None))

    async def _lookup(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            address = pick_address(infos)
        except (OSError, TimeoutError) as exc:
            self.failures += 1
            self.on_failure()
            log.warning("moriio: re-resolving %s failed (%s); keeping the last address", host, exc)
            return
        self.lookups += 1
        self.on_lookup()
        previous = self._cache.get(host)
        if previous is not None and previous[0] != address:
            self.changes += 1
            self.on_change()
            log.info("moriio: %s moved from %s to %s", host, previous[0], address)
        self._cache[host] = (address, self._clock())
