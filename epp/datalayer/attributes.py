"""Endpoint and request attributes: data one plugin produces and others read.

An attribute is named by ``(attribute, producer)``, as llm-d names its data keys: the
DCGM extractor publishes ``("GPUUtilization", "dcgm-extractor")`` on each endpoint, a
filter configured with ``attribute`` and ``producer`` reads exactly that. Endpoint
attributes live on ``Endpoint.attributes``; request attributes live in the scheduling
cycle's state and last one request.

A polled attribute carries an expiry: a source whose endpoint stops answering does not
leave an old reading in place for ever; once expired the attribute reads as missing,
and each reader's documented policy for a missing attribute applies. A dynamic
attribute is computed when read (topology from the pod's current labels, in-flight
counts from the producer's live counters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from epp.datastore import Endpoint
from epp.scheduling.cycle import CycleState, StateKey

__all__ = [
    "Attribute",
    "AttributeKey",
    "put_attribute",
    "put_dynamic_attribute",
    "put_request_attribute",
    "read_attribute",
    "read_request_attribute",
    "read_scalar",
]

T = TypeVar("T")

# (attribute name, producer name)
AttributeKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Attribute:
    """One stored value; ``expires_at`` is a ``time.monotonic()`` instant, or None."""

    value: object = None
    expires_at: float | None = None
    getter: Callable[[], object] | None = None

    def current(self, now: float) -> object:
        if self.getter is not None:
            return self.getter()
        if self.expires_at is not None and now > self.expires_at:
            return None
        return self.value


def put_attribute(
    endpoint: Endpoint, key: AttributeKey, value: object, *, expires_at: float | None = None
) -> None:
    endpoint.attributes[key] = Attribute(value, expires_at)


def put_dynamic_attribute(
    endpoint: Endpoint, key: AttributeKey, getter: Callable[[], object]
) -> None:
    endpoint.attributes[key] = Attribute(getter=getter)


def read_attribute(endpoint: Endpoint, key: AttributeKey, kind: type[T], now: float) -> T | None:
    """The attribute if present, unexpired and of type ``kind``; else None."""
    attr = endpoint.attributes.get(key)
    if attr is None:
        return None
    value = attr.current(now)
    return value if isinstance(value, kind) else None


def read_scalar(endpoint: Endpoint, key: AttributeKey, now: float) -> float | None:
    """A numeric attribute (llm-d's ``ScalarMetricValue``) as a float, or None."""
    attr = endpoint.attributes.get(key)
    if attr is None:
        return None
    value = attr.current(now)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


_REQUEST_ATTRIBUTES: StateKey[dict[AttributeKey, object]] = StateKey("request-attributes")


def put_request_attribute(cycle: CycleState, key: AttributeKey, value: object) -> None:
    attrs = cycle.get(_REQUEST_ATTRIBUTES)
    if attrs is None:
        attrs = {}
        cycle.put(_REQUEST_ATTRIBUTES, attrs)
    attrs[key] = value


def read_request_attribute(cycle: CycleState, key: AttributeKey) -> object | None:
    attrs = cycle.get(_REQUEST_ATTRIBUTES)
    return None if attrs is None else attrs.get(key)
