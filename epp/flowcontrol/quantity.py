"""Kubernetes resource quantities ("100", "1k", "1Gi", "500M") as llm-d's limits take them."""

from __future__ import annotations

import re

__all__ = ["parse_quantity"]

_SUFFIX = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)$")


def parse_quantity(value: str | int | float) -> int:
    """A non-negative whole quantity; ``ValueError`` naming the value otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"quantity must not be negative: {value}")
        return int(value)
    m = _QUANTITY.match(value.strip())
    if m is None:
        raise ValueError(f"not a quantity: {value!r} (use e.g. '100', '1k', '1Gi')")
    return int(float(m.group(1)) * _SUFFIX[m.group(2)])
