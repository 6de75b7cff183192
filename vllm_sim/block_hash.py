"""Block hashes as vLLM computes them with ``--prefix-caching-hash-algo sha256_cbor``.

Hash of a full block = SHA-256 of canonical CBOR ``[parent hash, [token ids], None]``;
the first block's parent is SHA-256 of the CBOR text of the hash seed (vLLM takes it
from ``PYTHONHASHSEED``, else ``"vllm-none-hash"``). Routers recompute these hashes from
the prompt, so they must match the engine bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["DEFAULT_SEED", "chain_hashes", "seed_hash"]

DEFAULT_SEED = "vllm-none-hash"


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes((major << 5 | n,))
    for code, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * width):
            return bytes((major << 5 | code,)) + n.to_bytes(width, "big")
    raise ValueError(f"token id {n} is out of range")


def seed_hash(seed: str | None) -> bytes:
    text = (DEFAULT_SEED if seed is None else seed).encode("utf-8")
    return hashlib.sha256(_cbor_head(3, len(text)) + text).digest()


def chain_hashes(token_ids: Sequence[int], block_size: int, seed: str | None) -> list[bytes]:
    """32-byte hashes of every full block of ``token_ids``."""
    out: list[bytes] = []
    parent = seed_hash(seed)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        chunk = token_ids[start : start + block_size]
        body = b"".join(_cbor_head(0, t) for t in chunk)
        # 0x83: array of 3; 0x58 0x20: 32-byte string; 0xf6: null (no extra keys).
        parent = hashlib.sha256(
            b"\x83\x58\x20" + parent + _cbor_head(4, len(chunk)) + body + b"\xf6"
        ).digest()
        out.append(parent)
    return out
