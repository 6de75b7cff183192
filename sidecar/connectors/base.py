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
    ends the decode leg with an error (sglang, mooncake).

The optional encode stage (E/P/D) is an :class:`EncodeStage`: it runs before prefill and
returns extra top-level fields the orchestrator hands to both legs through
:attr:`LegContext.extra`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import aiohttp

    from sidecar.api_shapes import ApiShape
    from sidecar.routing import HostPort

__all__ = [
    "Connector",
    "ConnectorOptions",
    "EncodeStage",
    "LegContext",
    "LegOrder",
    "PrefillResult",
]


class LegOrder(enum.Enum):
    SEQUENTIAL = "sequential"
    CONCURRENT = "concurrent"


@dataclass(frozen=True, slots=True)
class ConnectorOptions:
    """The settings a connector may read (kept apart from the full Settings on purpose)."""

    mooncake_bootstrap_port: int = 8998


@dataclass(frozen=True, slots=True)
class LegContext:
    """Everything a connector needs to build the legs of one request."""

    shape: ApiShape
    body: Mapping[str, Any]  # the client's parsed body: read it, never mutate it
    request_id: str
    prefiller: HostPort
    prepared: object | None = None  # what prepare() returned for this prefiller
    extra: Mapping[str, Any] = field(default_factory=dict)  # e.g. encode-stage params


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """What the decode leg needs from a finished prefill."""

    transfer_params: Mapping[str, Any] | None


class Connector(ABC):
    """One KV-transfer protocol. Subclasses set ``name`` and ``order``."""

    name: ClassVar[str]
    order: ClassVar[LegOrder]

    def __init__(self, options: ConnectorOptions) -> None:
        self.options = options

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


class EncodeStage(Protocol):
    """The encode stage of E/P/D (issue 6): returns extra fields for the next legs."""

    async def run(self, body: Mapping[str, Any], request_id: str) -> Mapping[str, Any]: ...
