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
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

__all__ = [
    "DEFAULT_HASH_SEED",
    "block_hashes",
    "cbor_encode",
    "external_hash",
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


# Encoded token ids, memoised: a vocabulary is small and prompts repeat tokens a lot.
_TOKEN_CBOR: dict[int, bytes] = {}
_TOKEN_CBOR_MAX = 1 << 20


def _token_cbor(t: int) -> bytes:
    enc = _TOKEN_CBOR.get(t)
    if enc is None:
        out = bytearray()
        _head(0, t, out)
        enc = bytes(out)
        if len(_TOKEN_CBOR) < _TOKEN_CBOR_MAX:
            _TOKEN_CBOR[t] = enc
    return enc


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
) -> list[bytes]:
    """The full 32-byte hashes of the full blocks of ``token_ids``, as the engine makes them."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n <= 0:
        return []
    parent = none_hash(seed)
    sha = hashlib.sha256
    join = b"".join
    # Every token's CBOR once (the memo in C), then per block: its 32-byte parent, the
    # array head and the block's encoded tokens, in one 3-array (prefix bytes fixed).
    used = token_ids[: n * block_size]
    encoded: list[bytes | None] = list(map(_TOKEN_CBOR.get, used))
    if None in encoded:
        pairs = zip(encoded, used, strict=True)
        encoded = [e if e is not None else _token_cbor(t) for e, t in pairs]
    head = bytearray()
    _head(4, block_size, head)
    lead = b"\x83\x58\x20"
    array_head = bytes(head)
    no_extra = cbor_encode(None)
    stream = join(encoded)  # type: ignore[arg-type]
    # Byte offset of every block boundary in the encoded stream.
    ends = list(accumulate(map(len, encoded)))  # type: ignore[arg-type]
    bounds = [0, *ends[block_size - 1 :: block_size]]
    out: list[bytes] = []
    for i in range(n):
        extra = no_extra if extra_keys is None else cbor_encode(extra_keys[i])
        tokens = stream[bounds[i] : bounds[i + 1]]
        parent = sha(lead + parent + array_head + tokens + extra).digest()
        out.append(parent)
    return out
