"""Per-endpoint load the EPP counts itself: charges that requests place on endpoints.

A charge adds an amount (one request, or a request's prompt tokens) to each of its
endpoints' totals and takes it back once: when its request releases it, or when it
has been held ``timeout_s`` (a request whose release never runs, a bug elsewhere, stops
counting then). Charges expire in the order they were made (one timeout for all), so
expiry pops from the front and a release deletes by id: both O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

__all__ = ["Charges"]


@dataclass(slots=True)
class _Charge:
    keys: list[str]
    amount: int
    expires: float


class Charges:
    def __init__(self, timeout_s: float, clock: Callable[[], float]) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        # Endpoint key -> the sum of its live charges (keys at 0 are absent).
        self.totals: dict[str, int] = {}
        self._live: OrderedDict[int, _Charge] = OrderedDict()
        self._next_id = 0

    def charge(self, keys: Sequence[str], amount: int = 1) -> int:
        """Adds ``amount`` to each of ``keys``; the id to release it with."""
        self.expire()
        cid = self._next_id
        self._next_id += 1
        if amount > 0 and keys:
            totals = self.totals
            for key in keys:
                totals[key] = totals.get(key, 0) + amount
            self._live[cid] = _Charge(list(keys), amount, self._clock() + self.timeout_s)
        return cid

    def release(self, cid: int) -> None:
        """Takes charge ``cid`` back (once: releasing again does nothing)."""
        charge = self._live.pop(cid, None)
        if charge is None:
            return
        totals = self.totals
        for key in charge.keys:
            left = totals.get(key, 0) - charge.amount
            if left > 0:
                totals[key] = left
            else:
                totals.pop(key, None)

    def expire(self) -> None:
        now = self._clock()
        live = self._live
        while live:
            cid, charge = next(iter(live.items()))
            if charge.expires > now:
                break
            self.release(cid)

    def forget(self, keys: Collection[str]) -> None:
        """Endpoints that left the pool: their totals go, and no charge counts them."""
        if not keys:
            return
        for key in keys:
            self.totals.pop(key, None)
        for charge in self._live.values():
            charge.keys = [k for k in charge.keys if k not in keys]

    def __len__(self) -> int:
        """Charges still held."""
        return len(self._live)
