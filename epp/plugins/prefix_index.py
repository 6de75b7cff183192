"""The approximate prefix index: chained block hashes and a per-endpoint LRU.

A prompt is cut into fixed-size blocks of tokens (``token_block_hashes``; the last,
partial block included, the chain seeded with the model name) or, for the legacy
``hashBlockSize`` setting, of bytes (``block_hashes``, full blocks only); block i's hash
covers block i and the hash of block i-1, so equal hashes mean equal prefixes. For
every endpoint the index keeps an LRU of the block hashes it routed there (bounded
by ``capacity``), and a reverse map hash -> endpoints that lets a lookup walk the
prompt once for all endpoints instead of once per endpoint.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

__all__ = ["PrefixIndex", "block_hashes", "token_block_hashes"]


def block_hashes(prompt: bytes, block_bytes: int, max_blocks: int) -> list[bytes]:
    """Chained hashes of the prompt's full blocks, at most ``max_blocks`` of them."""
    n = min(len(prompt) // block_bytes, max_blocks)
    out: list[bytes] = []
    prev = b""
    blake = hashlib.blake2b
    for i in range(n):
        start = i * block_bytes
        # Prepending the previous digest chains the blocks.
        prev = blake(prev + prompt[start : start + block_bytes], digest_size=16).digest()
        out.append(prev)
    return out


def _token_bytes(ids: Sequence[int]) -> bytes:
    try:
        return array("I", ids).tobytes()
    except OverflowError:
        return array("q", ids).tobytes()


def token_block_hashes(
    ids: Sequence[int],
    block_tokens: int,
    max_blocks: int | None,
    seed: str = "",
    *,
    parent: bytes | None = None,
) -> list[bytes]:
    """Chained hashes of ``block_tokens``-token blocks, the partial tail block included;
    at most ``max_blocks`` (None: all). The chain starts from the hash of ``seed``, or
    from ``parent``, the hash of the block before the first of ``ids`` (a chain hashed
    in pieces)."""
    n = -(-len(ids) // block_tokens)
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n <= 0:
        return []
    raw = _token_bytes(ids[: n * block_tokens])
    step = len(raw) // len(ids[: n * block_tokens]) * block_tokens
    blake = hashlib.blake2b
    prev = (
        blake(seed.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if parent is None
        else parent
    )
    out: list[bytes] = []
    for i in range(n):
        prev = blake(prev + raw[i * step : (i + 1) * step], digest_size=16).digest()
        out.append(prev)
    return out


class PrefixIndex:
    """Per-endpoint LRU of routed block hashes; longest leading run per endpoint."""

    def __init__(self, capacity_per_endpoint: int) -> None:
        self.capacity = capacity_per_endpoint
        self._lru: dict[str, OrderedDict[bytes, None]] = {}
        self._holders: dict[bytes, set[str]] = {}

    def match(self, hashes: Sequence[bytes]) -> dict[str, int]:
        """Endpoint key -> number of leading blocks of ``hashes`` it holds (0 omitted)."""
        matched: dict[str, int] = {}
        if not hashes:
            return matched
        first = self._holders.get(hashes[0])
        if not first:
            return matched
        alive = set(first)
        i = 1
        for i in range(1, len(hashes)):
            holders = self._holders.get(hashes[i])
            still = alive & holders if holders else set()
            if len(still) != len(alive):
                for key in alive - still:
                    matched[key] = i
                alive = still
                if not alive:
                    return matched
        else:
            i = len(hashes)
        for key in alive:
            matched[key] = i
        return matched

    def record(self, key: str, hashes: Iterable[bytes], capacity: int | None = None) -> list[bytes]:
        """Remember that ``hashes`` were routed to endpoint ``key``; returns those that
        ``key`` did not hold before. ``capacity`` overrides the index's bound for this
        endpoint (its engine's own block count)."""
        lru = self._lru.get(key)
        if lru is None:
            lru = self._lru[key] = OrderedDict()
        holders = self._holders
        added: list[bytes] = []
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            added.append(h)
            owners = holders.get(h)
            if owners is None:
                holders[h] = {key}
            else:
                owners.add(key)
        bound = capacity if capacity is not None and capacity > 0 else self.capacity
        while len(lru) > bound:
            old, _ = lru.popitem(last=False)
            self._forget(old, key)
        return added

    def discard(self, key: str, hashes: Iterable[bytes]) -> None:
        """Forget that endpoint ``key`` holds ``hashes`` (a request routed there that it
        did not serve)."""
        lru = self._lru.get(key)
        if lru is None:
            return
        for h in hashes:
            if h in lru:
                del lru[h]
                self._forget(h, key)

    def remove_endpoint(self, key: str) -> None:
        lru = self._lru.pop(key, None)
        if lru is not None:
            for h in lru:
                self._forget(h, key)

    def _forget(self, h: bytes, key: str) -> None:
        owners = self._holders.get(h)
        if owners is not None:
            owners.discard(key)
            if not owners:
                del self._holders[h]

    def size(self, key: str) -> int:
        lru = self._lru.get(key)
        return len(lru) if lru is not None else 0

    def total_blocks(self) -> int:
        return len(self._holders)
