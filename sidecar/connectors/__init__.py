"""Connector registry: ``--kv-connector`` name -> connector class.

A name not registered here stops start-up (it is never replaced by a default).
"""

from __future__ import annotations

from sidecar.connectors.base import (
    Connector,
    ConnectorOptions,
    EncodeStage,
    LegContext,
    LegOrder,
    MoriioOptions,
    PrefillResult,
)
from sidecar.connectors.mooncake import MooncakeConnector
from sidecar.connectors.moriio import MoriioConnector
from sidecar.connectors.nixlv2 import NixlV2Connector
from sidecar.connectors.offloading import OffloadingConnector
from sidecar.connectors.sglang import SGLangConnector
from sidecar.connectors.shared_storage import SharedStorageConnector

__all__ = [
    "Connector",
    "ConnectorOptions",
    "EncodeStage",
    "LegContext",
    "LegOrder",
    "MoriioOptions",
    "PrefillResult",
    "available_connectors",
    "create_connector",
    "register",
]

_REGISTRY: dict[str, type[Connector]] = {}


def register(cls: type[Connector]) -> type[Connector]:
    """Add a connector class under its ``name``; a second class with that name is an error."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"connector name {cls.name!r} already registered by {existing!r}")
    if not isinstance(getattr(cls, "order", None), LegOrder):
        raise TypeError(f"connector {cls.__name__} must declare order: LegOrder")
    _REGISTRY[cls.name] = cls
    return cls


def available_connectors() -> frozenset[str]:
    return frozenset(_REGISTRY)


def create_connector(name: str, options: ConnectorOptions) -> Connector:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown KV connector {name!r}") from None
    return cls.create(options)


for _builtin in (
    NixlV2Connector,
    SharedStorageConnector,
    SGLangConnector,
    MooncakeConnector,
    MoriioConnector,
    OffloadingConnector,
):
    register(_builtin)
