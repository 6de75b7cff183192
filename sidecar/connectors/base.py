"""The Connector contract: connectors translate bodies, the orchestrator does everything else.

A connector is told the client's parsed body and returns the body of each leg. It never
sends anything itself, except in :meth:`Connector.prepare`, its optional per-prefiller
set-up step (for example a bootstrap ``/query``) whose result the orchestrator caches
per prefiller and forgets when a prefill to that target fails.

Leg order (:attr:`Connector.order`):

``SEQUENTIAL``
    prefill first; its parsed answer goes through :meth:`Connector.read_prefill`, which
    returns the :class:`PrefillResult` handed to :meth:`Connector.decode_body`
    (nixlv2, shared-storage).
``CONCURRENT``
    both legs start together; :meth:`Connector.decode_body` gets ``None`` and the
    prefill answer is only checked by :meth:`Connector.read_prefill`. A failed prefill
    ends the decode leg with an error (sglang, mooncake). Values both legs must agree on
    (a rendezvous room, a transfer id) derive from :attr:`LegContext.pairing`.

A pull source (:attr:`LegContext.kv_source`, from ``x-kv-cache-source-host-port``) goes on
the prefill leg as ``kv_transfer_params.remote_kv_source`` (connectors that speak the
OffloadingConnector P2P tier: offloading, and nixlv2 with ``--enable-p2p-pull``).

A prefill whose generation already ended on its first token (``Finish.STOPPED``) holds
no KV; :meth:`Connector.read_prefill` says so with ``generation_finished`` and the
orchestrator decodes :meth:`Connector.local_body` instead: the answer a single engine
would give. A prefill that stopped at the cap without what the decode needs is an error.

Decode first (optional, sequential connectors): when :meth:`Connector.decode_first_body`
returns a body, the orchestrator sends it to the decode engine before any prefill. If
that attempt finishes with :attr:`Connector.decline_reason` as its finish reason before
producing output, it is dropped unseen and the usual prefill-then-decode order follows;
otherwise it is the client's answer (shared-storage's ``cache_hit_threshold``).

Held decode (optional, concurrent connectors): with :attr:`Connector.commit_timeout` set,
the decode leg's answer is held back until the prefill succeeded, so a failed prefill
is what the client sees (never a decode answer); a prefill not done within that many
seconds fails the request with 504 (MoRI-IO parallel dispatch).

The optional encode stage (E/P/D) is an :class:`EncodeStage`: it runs before prefill and
returns extra top-level fields the orchestrator hands to the connector through
:attr:`LegContext.extra` (connectors put them on the prefill leg).
"""

from __future__ import annotations

import enum
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from sidecar.p2p import P2PTier, same_endpoint

if TYPE_CHECKING:
    import aiohttp
    from multidict import CIMultiDict

    from sidecar.api_shapes import ApiShape
    from sidecar.exchange import Exchange
    from sidecar.routing import HostPort

__all__ = [
    "Connector",
    "ConnectorOptions",
    "EncodeStage",
    "LegContext",
    "LegOrder",
    "MoriioOptions",
    "PrefillResult",
]


class LegOrder(enum.Enum):
    SEQUENTIAL = "sequential"
    CONCURRENT = "concurrent"


@dataclass(frozen=True, slots=True)
class MoriioOptions:
    """The ``--moriio-*`` flags (llm-d's names and defaults, vLLM's MoRI-IO ports)."""

    write_mode: bool = False
    parallel_dispatch: bool = False
    parallel_decode_wait_timeout: float = 30.0
    local_pod_ip: str = ""  # the decode pod's address: DNS name or IP
    decode_notify_port: int = 61005
    decode_handshake_port: int = 6301
    prefill_notify_port: int = 61005
    prefill_handshake_port: int = 6301
    tp_size: int = 1
    dp_size: int = 1
    dp_size_local: int = 0
    remote_hosts: tuple[str, ...] = ()  # prefill-side pods (Wide-EP fan-out)
    decode_hosts: tuple[str, ...] = ()  # decode-side pods
    dns_ttl: float = 30.0
    dns_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class ConnectorOptions:
    """The settings a connector may read (kept apart from the full Settings on purpose)."""

    mooncake_bootstrap_port: int = 8998
    sglang_bootstrap_port: int = 8998
    moriio: MoriioOptions = field(default_factory=MoriioOptions)
    p2p: P2PTier = field(default_factory=P2PTier)  # OffloadingConnector P2P tier ports


@dataclass(frozen=True, slots=True)
class LegContext:
    """Everything a connector needs to build the legs of one request."""

    shape: ApiShape
    body: Mapping[str, Any]  # the client's parsed body: read it, never mutate it
    request_id: str
    prefiller: HostPort
    prepared: object | None = None  # what prepare() returned for this prefiller
    extra: Mapping[str, Any] = field(default_factory=dict)  # e.g. encode-stage params
    # Random bits drawn once per request, the same for every leg built from this context.
    pairing: int = field(default_factory=lambda: random.getrandbits(128))
    # A peer to pull the prompt's cached prefix from over the P2P tier
    # (x-kv-cache-source-host-port, already checked); None: no pull.
    kv_source: HostPort | None = None

    def pull_source(self) -> HostPort | None:
        """The prefill leg's pull source: none when it names the prefiller itself."""
        source = self.kv_source
        if source is None or same_endpoint(source, self.prefiller):
            return None
        return source


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """What the decode leg needs from a finished prefill."""

    transfer_params: Mapping[str, Any] | None
    # The prefill's generation already ended (EOS or a stop string on its first token):
    # no KV is held for a decode, and the client's answer comes from a decode of its own
    # body (``Connector.local_body``).
    generation_finished: bool = False


class Connector(ABC):
    """One KV-transfer protocol. Subclasses set ``name`` and ``order``."""

    name: ClassVar[str]
    order: ClassVar[LegOrder]
    # Finish reason by which a decode-first attempt declines (see the module docstring).
    decline_reason: ClassVar[str | None] = None
    # Concurrent legs only: hold the decode answer until the prefill succeeded, and fail
    # with 504 when the prefill takes longer than this many seconds (None: no hold).
    commit_timeout: float | None = None
    # Concurrent legs: a prefill still running when the decode answered completely is
    # left to finish (bounded by --prefill-timeout) instead of being cancelled.
    prefill_outlives_decode: ClassVar[bool] = False

    def __init__(self, options: ConnectorOptions) -> None:
        self.options = options

    @classmethod
    def create(cls, options: ConnectorOptions) -> Connector:
        """The connector for these options (a subclass may pick a variant of itself)."""
        return cls(options)

    async def prepare(self, prefiller: HostPort, session: aiohttp.ClientSession) -> object | None:
        """Per-prefiller set-up, cached by the orchestrator. Raise to fail the request."""
        return None

    @abstractmethod
    def prefill_body(self, ctx: LegContext) -> dict[str, Any]:
        """Body of the prefill leg (a new dict; ``ctx.body`` stays untouched)."""

    @abstractmethod
    def read_prefill(self, ctx: LegContext, payload: object) -> PrefillResult:
        """Check a 2xx prefill answer; raise ``PrefillIncomplete`` when it is unusable."""

    @abstractmethod
    def decode_body(self, ctx: LegContext, prefill: PrefillResult | None) -> dict[str, Any]:
        """Body of the decode leg; ``prefill`` is None for concurrent connectors."""

    def decode_first_body(self, ctx: LegContext) -> dict[str, Any] | None:
        """Body of a decode attempt sent before any prefill, or None (the usual order)."""
        return None

    def local_body(self, ctx: LegContext) -> dict[str, Any]:
        """Body of a decode that runs without KV from any prefill: the prefill failed under
        ``--prefill-fallback=local``, or its generation finished on the first token."""
        return {**ctx.body, **ctx.extra}

    def prefill_headers(self, ctx: LegContext) -> Mapping[str, str]:
        """Extra headers of the prefill leg (e.g. a data-parallel rank to pin)."""
        return {}

    def decode_headers(self, ctx: LegContext, prefill: PrefillResult | None) -> Mapping[str, str]:
        """Extra headers of the decode leg; ``prefill`` is None for concurrent connectors."""
        return {}


class EncodeStage(Protocol):
    """The encode stage of E/P/D: returns extra top-level fields for the next leg.

    ``headers`` are the request headers every leg carries (request id, trace context);
    ``encoders`` come from the routing header. Failures raise a ``SidecarError``.
    """

    async def run(
        self,
        body: Mapping[str, Any],
        encoders: list[HostPort],
        headers: CIMultiDict[str],
        ex: Exchange,
    ) -> Mapping[str, Any]: ...
