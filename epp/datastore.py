"""The endpoints the EPP knows about, with their labels, role and scraped signals.

Discovery sources write endpoints (``replace_source``); the scraper writes metrics;
scheduling reads an immutable snapshot. Everything runs on one event loop, so plain
dicts suffice; the snapshot tuple is rebuilt only when membership changes.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.roles import ROLE_LABEL

__all__ = [
    "ROLE_LABEL",
    "STALE_METRICS",
    "Datastore",
    "Endpoint",
    "EndpointMetrics",
    "address_host",
    "format_host_port",
    "normalize_host",
    "split_address",
]

# What a stale endpoint looks like to scorers: busy and full, so it never looks idle.
_STALE_QUEUE = 1_000_000


def format_host_port(host: str, port: int) -> str:
    """``host:port`` with IPv6 literals bracketed."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def normalize_host(host: str) -> str:
    """One spelling per address: IP literals in canonical form (``fd00:0::1`` and
    ``fd00::1`` are one address), names lower-cased."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def split_address(address: str) -> tuple[str, int | None]:
    """The normalized host and the port of ``ip:port``, ``[ipv6]:port``, a bare IPv6
    literal or a bare host (port None when there is none, or it is not a number)."""
    text = address.strip()
    port_text = ""
    if text.startswith("["):
        end = text.find("]")
        host = text[1:end] if end != -1 else text[1:]
        if end != -1 and text[end + 1 : end + 2] == ":":
            port_text = text[end + 2 :]
    elif text.count(":") == 1:
        host, port_text = text.split(":", 1)
    else:
        host = text  # a bare host, or a bare IPv6 literal (no port)
    port = int(port_text) if port_text.isdigit() else None
    return normalize_host(host), port


def address_host(address: str) -> str:
    """The normalized host of an address (see ``split_address``); the port is ignored."""
    return split_address(address)[0]


@dataclass(slots=True)
class EndpointMetrics:
    """The signals scraped from one engine's /metrics."""

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    running_loras: tuple[str, ...] = ()
    waiting_loras: tuple[str, ...] = ()
    max_lora: int | None = None
    # time.monotonic() of the last successful scrape; 0 = never scraped.
    updated_at: float = 0.0


STALE_METRICS = EndpointMetrics(
    waiting=_STALE_QUEUE, running=_STALE_QUEUE, kv_usage=1.0, updated_at=0.0
)


@dataclass(slots=True, eq=False)
class Endpoint:
    """One schedulable engine port (a pod may contribute several, one per target port)."""

    name: str
    address: str
    port: int
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics: EndpointMetrics = field(default_factory=EndpointMetrics)
    key: str = ""
    # The address in the form ``address_host`` gives, for matching by host.
    host: str = ""
    # The node's IP (a pod's status.hostIP) and the pod's spec.hostname, when known.
    node_address: str = ""
    pod_hostname: str = ""
    # Data-layer attributes by (attribute, producer); see epp.datalayer.attributes.
    attributes: dict[tuple[str, str], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.key = format_host_port(self.address, self.port)
        self.host = normalize_host(self.address)

    @property
    def role(self) -> str | None:
        """The ``llm-d.ai/role`` label, or None when the pod has none."""
        return self.labels.get(ROLE_LABEL)

    @property
    def url(self) -> str:
        return f"http://{self.key}"

    def is_fresh(self, now: float, threshold_s: float) -> bool:
        updated = self.metrics.updated_at
        return updated > 0.0 and now - updated <= threshold_s

    def signals(self, now: float, threshold_s: float) -> EndpointMetrics:
        """The metrics scorers should use: pessimistic when stale or never scraped."""
        return self.metrics if self.is_fresh(now, threshold_s) else STALE_METRICS


Listener = Callable[[list[Endpoint], list[Endpoint]], None]


class Datastore:
    """Endpoints by key, grouped by the discovery source that reported them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._by_key: dict[str, Endpoint] = {}
        self._by_source: dict[str, set[str]] = {}
        self._snapshot: tuple[Endpoint, ...] = ()
        self._listeners: list[Listener] = []
        self.clock = clock

    def add_listener(self, listener: Listener) -> None:
        """``listener(added, removed)`` runs after every membership change."""
        self._listeners.append(listener)

    def snapshot(self) -> tuple[Endpoint, ...]:
        return self._snapshot

    def get(self, key: str) -> Endpoint | None:
        return self._by_key.get(key)

    def find(self, address: str) -> Endpoint | None:
        """The endpoint at ``host:port`` however the address is spelled, or None."""
        found = self._by_key.get(address)
        if found is not None:
            return found
        host, port = split_address(address)
        if port is None:
            return None
        for ep in self._snapshot:
            if ep.port == port and ep.host == host:
                return ep
        return None

    def __len__(self) -> int:
        return len(self._by_key)

    def replace_source(self, source: str, endpoints: Iterable[Endpoint]) -> None:
        """Make ``source``'s endpoints exactly ``endpoints``; keeps metrics of survivors."""
        wanted = {ep.key: ep for ep in endpoints}
        old_keys = self._by_source.get(source, set())
        added: list[Endpoint] = []
        removed: list[Endpoint] = []
        for key in old_keys - wanted.keys():
            gone = self._by_key.pop(key, None)
            if gone is not None:
                removed.append(gone)
        for key, ep in wanted.items():
            current = self._by_key.get(key)
            if current is None:
                self._by_key[key] = ep
                added.append(ep)
            else:
                # Labels may change (e.g. a role relabel); scraped state carries over.
                current.name = ep.name
                current.namespace = ep.namespace
                current.labels = ep.labels
                current.node_address = ep.node_address
                current.pod_hostname = ep.pod_hostname
        self._by_source[source] = set(wanted)
        self._snapshot = tuple(self._by_key.values())
        for listener in self._listeners:
            listener(added, removed)

    def count_fresh(self, threshold_s: float) -> int:
        now = self.clock()
        return sum(1 for ep in self._snapshot if ep.is_fresh(now, threshold_s))
