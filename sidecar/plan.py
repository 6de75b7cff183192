"""Which way one generation request goes: a pure decision, made once, without I/O.

:func:`plan` reads the routing headers (already extracted from the request) and the
facts of the configuration, and returns a :class:`Plan`:

``LOCAL``
    no prefill target (and no encode stage to run): decode-only, the client's body to
    the local engine as sent, once checked.
``ENCODE``
    encoder targets but no prefill target (E/PD): the encode stage, then the decode leg
    with its outputs.
``SEQUENTIAL``
    prefill, then decode with what the prefill handed over (nixlv2, shared-storage).
``DECODE_FIRST``
    as ``SEQUENTIAL``, but the decode engine is asked first and may decline (a connector
    with a ``decline_reason``, shared-storage's cache-hit threshold).
``CONCURRENT``
    both legs at once, paired (sglang, mooncake).

Any of the last three may run the encode stage first (``Plan.encoders``). What to do
when the prefill fails is the second decision, :func:`on_prefill_failure`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from sidecar.connectors import LegOrder
from sidecar.routing import ENCODER_HOSTS_PORTS, HostPort, parse_host_ports, pick

__all__ = ["Failure", "Plan", "Route", "on_prefill_failure", "plan"]


class Route(enum.Enum):
    LOCAL = "local"
    ENCODE = "encode"
    SEQUENTIAL = "sequential"
    DECODE_FIRST = "decode-first"
    CONCURRENT = "concurrent"


@dataclass(frozen=True, slots=True)
class Plan:
    route: Route
    prefillers: tuple[HostPort, ...] = ()
    first: int = 0  # index of the prefiller tried first
    encoders: tuple[HostPort, ...] | None = None  # run the encode stage on these

    @property
    def mode(self) -> str:
        """The access log's mode: pd, epd or local."""
        if self.route is Route.LOCAL:
            return "local"
        return "epd" if self.route is Route.ENCODE else "pd"

    def prefiller(self, attempt: int) -> HostPort:
        """The prefiller of attempt ``attempt`` (0-based): along the list from ``first``."""
        return self.prefillers[(self.first + attempt) % len(self.prefillers)]


def plan(
    prefill_header: str | None,
    encoders_header: str | None,
    *,
    order: LegOrder,
    decode_first: bool,
    encode_stage: bool,
    sampling: bool,
) -> Plan:
    """The route of one request.

    ``order`` and ``decode_first`` describe the connector (its leg order, whether it has
    a decline reason); ``encode_stage`` says whether an encode stage is configured;
    ``sampling`` picks a random first prefiller. Malformed headers raise
    :class:`~sidecar.errors.InvalidRoutingHeader`.
    """
    if prefill_header is None:
        if encoders_header and encode_stage:
            return Plan(Route.ENCODE, encoders=_encoders(encoders_header))
        return Plan(Route.LOCAL)
    prefillers = tuple(parse_host_ports(prefill_header))
    first = pick(list(prefillers), sampling)
    encoders = _encoders(encoders_header) if encoders_header is not None and encode_stage else None
    if order is LegOrder.CONCURRENT:
        route = Route.CONCURRENT
    else:
        route = Route.DECODE_FIRST if decode_first else Route.SEQUENTIAL
    return Plan(route, prefillers, first, encoders)


def _encoders(value: str) -> tuple[HostPort, ...]:
    return tuple(parse_host_ports(value, ENCODER_HOSTS_PORTS))


class Failure(enum.Enum):
    """What a failed prefill stage becomes."""

    ERROR = "error"  # the client gets the error
    LOCAL_AS_SENT = "local-as-sent"  # decode the client's own bytes locally
    LOCAL_REBUILT = "local-rebuilt"  # decode locally a body rebuilt by the connector


def on_prefill_failure(
    fallback: Literal["error", "local"], *, rejected: bool, extra: bool, declined: bool
) -> Failure:
    """``rejected``: the prefill answered 4xx (the client's own fault, never hidden);
    ``extra``: the encode stage produced fields the client's bytes lack; ``declined``:
    a decode-first attempt declined (the bytes as sent would decline again)."""
    if rejected or fallback != "local":
        return Failure.ERROR
    return Failure.LOCAL_REBUILT if extra or declined else Failure.LOCAL_AS_SENT
