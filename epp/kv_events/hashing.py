"""vLLM's prefix-cache block hashes (``--prefix-caching-hash-algo sha256_cbor``).

A block's hash is SHA-256 over the canonical CBOR encoding of the triple
``(parent hash, token ids of the block, extra keys or None)``; the first block's parent
is ``NONE_HASH`` = SHA-256 over the CBOR of the seed string (``PYTHONHASHSEED`` on the
engine, ``"vllm-none-hash"`` when unset). Only the CBOR subset those triples use is
encoded here (a dependency for 40 lines is not worth it).

Hashes are compared as 64-bit integers (the low 8 bytes, big-endian): that is what vLLM
publishes with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` and keeps the index small.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any, Literal

__all__ = [
    "DEFAULT_HASH_SEED",
    "BlockHashMemo",
    "block_hashes",
    "cbor_encode",
    "external_hash",
    "fill_token_table",
    "hash_keys",
    "none_hash",
]

DEFAULT_HASH_SEED = "vllm-none-hash"
_MASK64 = (1 << 64) - 1


def _head(major: int, n: int, out: bytearray) -> None:
    if n < 24:
        out.append(major << 5 | n)
    elif n < 0x100:
        out.append(major << 5 | 24)
        out.append(n)
    elif n < 0x10000:
        out.append(major << 5 | 25)
        out += n.to_bytes(2, "big")
    elif n < 0x100000000:
        out.append(major << 5 | 26)
        out += n.to_bytes(4, "big")
    elif n <= _MASK64:
        out.append(major << 5 | 27)
        out += n.to_bytes(8, "big")
    else:
        raise ValueError(f"integer {n} does not fit CBOR's 64-bit heads")


def _encode(value: Any, out: bytearray) -> None:
    # bool before int: bool is an int subclass.
    if value is None:
        out.append(0xF6)
    elif value is True:
        out.append(0xF5)
    elif value is False:
        out.append(0xF4)
    elif isinstance(value, int):
        if value >= 0:
            _head(0, value, out)
        else:
            _head(1, -1 - value, out)
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        _head(2, len(data), out)
        out += data
    elif isinstance(value, str):
        data = value.encode("utf-8")
        _head(3, len(data), out)
        out += data
    elif isinstance(value, tuple | list):
        _head(4, len(value), out)
        for item in value:
            _encode(item, out)
    else:
        raise TypeError(f"cannot CBOR-encode {type(value).__name__}")


def cbor_encode(value: Any) -> bytes:
    """Canonical CBOR of None, bool, int, bytes, str and nested tuples/lists."""
    out = bytearray()
    _encode(value, out)
    return bytes(out)


# The CBOR of every token id below the table's length, by id (grown to the largest id
# seen, up to _TABLE_MAX: a vocabulary): a prompt's tokens are encoded by one C call.
_TOKEN_TABLE: list[bytes] = []
_TABLE_MAX = 1 << 18
_TABLE_LOCK = threading.Lock()


def _token_cbor(t: int) -> bytes:
    out = bytearray()
    if t >= 0:
        _head(0, t, out)
    else:
        _head(1, -1 - t, out)
    return bytes(out)


# The CBOR heads of unsigned ints from 24 on, by range: (first, end, head byte, width of
# the value that follows in bytes, its array typecode).
_UINT_HEADS = (
    (24, 1 << 8, 0x18, 1, "B"),
    (1 << 8, 1 << 16, 0x19, 2, "H"),
    (1 << 16, 1 << 32, 0x1A, 4, "I" if array("I").itemsize == 4 else "L"),
)


def _token_cbors(start: int, stop: int) -> list[bytes]:
    """``_token_cbor(t)`` for each ``start <= t < stop`` (``stop <= 2**32``), made a range
    at a time by C-level packing and slicing: a 150K-id vocabulary in about 30 ms, where
    one call per id took about 90."""
    out = [bytes((t,)) for t in range(start, min(stop, 24))]
    for first, end, head, width, typecode in _UINT_HEADS:
        lo, hi = max(start, first), min(stop, end)
        if lo >= hi:
            continue
        values = array(typecode, range(lo, hi))
        if width > 1 and sys.byteorder == "little":
            values.byteswap()  # CBOR is big-endian
        raw = values.tobytes()
        step = 1 + width
        records = bytearray(step * (hi - lo))
        records[0::step] = bytes((head,)) * (hi - lo)
        for k in range(width):
            records[1 + k :: step] = raw[k::width]
        data = bytes(records)
        out += [data[i : i + step] for i in range(0, len(data), step)]
    return out


def fill_token_table() -> None:
    """Encode every id below ``_TABLE_MAX`` now (about 55 ms and 12 MB, once per process)
    rather than during the decision of the first long prompt, which growing the table to
    a 150K-id vocabulary slowed from 8 to 64 ms."""
    with _TABLE_LOCK:
        if len(_TOKEN_TABLE) < _TABLE_MAX:
            _TOKEN_TABLE.extend(_token_cbors(len(_TOKEN_TABLE), _TABLE_MAX))


def _encode_tokens(tokens: Sequence[int]) -> Sequence[bytes]:
    """The CBOR of each token id (negative ids and ids beyond 64 bits as ``cbor_encode``
    makes or refuses them)."""
    if len(tokens) < 2:
        return [_token_cbor(t) for t in tokens]
    table = _TOKEN_TABLE
    if min(tokens) >= 0:  # a negative id would index the table from its end
        getter = itemgetter(*tokens)
        try:
            return getter(table)  # type: ignore[no-any-return]
        except IndexError:
            top = max(tokens)
            if top < _TABLE_MAX:
                with _TABLE_LOCK:  # callers may hash on several threads
                    table.extend(_token_cbors(len(table), top + 1))
                return getter(table)  # type: ignore[no-any-return]
    return [_token_cbor(t) for t in tokens]


def hash_keys(hashes: Sequence[bytes]) -> list[int]:
    """``external_hash`` of each full 32-byte block hash: the index's keys."""
    big: Literal["big"] = "big"
    return list(map(int.from_bytes, map(_LOW8, hashes), repeat(big)))


_LOW8 = itemgetter(slice(-8, None))


def none_hash(seed: str | None = None) -> bytes:
    """The parent hash of every first block, for the engines' ``PYTHONHASHSEED``."""
    return hashlib.sha256(cbor_encode(DEFAULT_HASH_SEED if seed is None else seed)).digest()


def external_hash(value: bytes | int) -> int:
    """A published block hash (32 bytes or an int) as the index's 64-bit key."""
    if isinstance(value, int):
        return value & _MASK64
    return int.from_bytes(value[-8:], "big")


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    seed: str | None = None,
    *,
    max_blocks: int | None = None,
    extra_keys: Sequence[tuple[Any, ...] | None] | None = None,
    parent: bytes | None = None,
) -> list[bytes]:
    """The full 32-byte hashes of the full blocks of ``token_ids``, as the engine makes them.

    ``parent``: the hash of the block before the first of ``token_ids`` (a chain hashed in
    pieces); none: the first block is the prompt's first."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n <= 0:
        return []
    if parent is None:
        parent = none_hash(seed)
    sha = hashlib.sha256
    # Per block, one 3-array: the parent's 32-byte string (its head is fixed), the
    # block's array head and encoded tokens, the extra keys.
    encoded = _encode_tokens(token_ids[: n * block_size])
    head = bytearray()
    _head(4, block_size, head)
    lead = b"\x83\x58\x20"
    array_head = bytes(head)
    no_extra = cbor_encode(None)
    join = b"".join
    out: list[bytes] = []
    for i in range(n):
        extra = no_extra if extra_keys is None else cbor_encode(extra_keys[i])
        tokens = join(encoded[i * block_size : (i + 1) * block_size])
        parent = sha(lead + parent + array_head + tokens + extra).digest()
        out.append(parent)
    return out


_KEY_TYPECODES = ("I", "q")


class BlockHashMemo:
    """The hashes and index keys of recently hashed runs of blocks, by exactly what
    determines them: the seed, the block size, the parent hash and the run's token ids
    (packed as unsigned 32-bit ints, or as 64-bit ones when an id does not fit). A
    prompt that starts like a recent one (a shared document, system prompt or agent
    context) is then hashed only from where it departs; equal keys give equal hashes, so
    what is found is what hashing would give. At most ``max_runs`` runs are kept, the
    least recently used dropped first."""

    def __init__(self, max_runs: int) -> None:
        self.max_runs = max_runs
        self._runs: OrderedDict[tuple[object, ...], tuple[list[bytes], list[int]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runs)

    @staticmethod
    def key(
        token_ids: Sequence[int], block_size: int, seed: str | None, parent: bytes | None
    ) -> tuple[object, ...] | None:
        """The run's key; None when an id does not fit 64 bits (such runs are not kept)."""
        # Ids below 2^32 (every vocabulary) pack about four times faster as unsigned
        # 32-bit ints than as 64-bit ones; the typecode keeps the two packings apart. Ids
        # read packed (an array of 64-bit ints) are keyed by their own bytes.
        if isinstance(token_ids, array) and token_ids.typecode == "q":
            return (seed, block_size, parent, "q", token_ids.tobytes())
        for typecode in _KEY_TYPECODES:
            try:
                packed = array(typecode, token_ids).tobytes()
            except (OverflowError, TypeError):
                continue
            return (seed, block_size, parent, typecode, packed)
        return None

    def get(self, key: tuple[object, ...]) -> tuple[list[bytes], list[int]] | None:
        found = self._runs.get(key)
        if found is not None:
            self._runs.move_to_end(key)
        return found

    def put(self, key: tuple[object, ...], hashes: list[bytes], keys: list[int]) -> None:
        self._runs[key] = (hashes, keys)
        self._runs.move_to_end(key)
        while len(self._runs) > self.max_runs:
            self._runs.popitem(last=False)
