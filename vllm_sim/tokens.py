"""Deterministic pseudo-tokenisation and deterministic output text.

Words and punctuation marks are tokens; a token's id is a stable hash of its text, so the
same text always yields the same ids on every engine (as a shared tokenizer would).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from common.multimodal import MULTIMODAL_PART_TYPES

__all__ = [
    "VOCAB_SIZE",
    "chat_prompt",
    "decode_token",
    "mm_hash",
    "multimodal_items",
    "output_token_ids",
    "source_of",
    "tokenize",
]

VOCAB_SIZE = 32000
_RESERVED = 256  # ids below this are never produced by ``tokenize``
_TOKEN_RE = re.compile(r"<\|[a-z_]+\|>|\w+|[^\w\s]")

# Output vocabulary: id -> text. Output ids live in their own range above the reserved ids.
_OUTPUT_WORDS = (
    "the",
    "model",
    "simulates",
    "a",
    "decode",
    "engine",
    "that",
    "streams",
    "tokens",
    "with",
    "steady",
    "latency",
    "and",
    "reports",
    "cached",
    "prefix",
    "blocks",
    "from",
    "remote",
    "prefill",
    "workers",
    "over",
    "side",
    "channel",
    "while",
    "leases",
    "keep",
    "memory",
    "pinned",
    "until",
    "pulled",
    "once",
    "by",
    "its",
    "peer",
    "so",
    "every",
    "request",
    "gets",
    "an",
    "answer",
    "or",
    "clean",
    "error",
    "in",
    "time",
    "for",
    "users",
)
_OUTPUT_BASE = 100


def tokenize(text: str) -> list[int]:
    """Split text into word/punctuation tokens and map each to a stable id."""
    span = VOCAB_SIZE - _RESERVED
    # surrogatepass: JSON lets a client send a lone surrogate (\ud800), which has no UTF-8.
    pieces = _TOKEN_RE.findall(text)
    return [_RESERVED + zlib.crc32(p.encode("utf-8", "surrogatepass")) % span for p in pieces]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts: list[str] = []
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text"):
                parts.append(str(part.get("text", "")))
            elif kind is not None:
                # A multimodal item becomes a placeholder plus its identity, so two
                # different images give two different prompts.
                parts.append(f"<|{_safe_kind(str(kind))}|> {_item_identity(part)}")
    return " ".join(parts)


def _safe_kind(kind: str) -> str:
    return re.sub(r"[^a-z_]", "_", kind.lower()) or "item"


MULTIMODAL_KINDS = MULTIMODAL_PART_TYPES


def _item_source(part: Mapping[str, Any]) -> str | None:
    """What identifies a multimodal item: its URL, or its inline data."""
    kind = part.get("type")
    if kind not in MULTIMODAL_KINDS:
        return None
    value = part.get(str(kind))
    if isinstance(value, Mapping):
        value = value.get("url") or value.get("data")
    return None if value is None else f"{kind}:{value}"


def source_of(part: Mapping[str, Any]) -> str | None:
    """What identifies a multimodal content part (None for other parts)."""
    return _item_source(part)


def _item_identity(part: Mapping[str, Any]) -> str:
    source = _item_source(part)
    if not source:
        return "item"
    return f"item{zlib.crc32(source.encode('utf-8', 'surrogatepass')):08x}"


def mm_hash(source: str) -> str:
    """The key an encoder's output is stored and transferred under."""
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def multimodal_items(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    """The distinct items of a chat request, in order of first appearance."""
    seen: dict[str, None] = {}
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, Mapping) and (source := _item_source(part)) is not None:
                seen.setdefault(source, None)
    return list(seen)


def chat_prompt(
    messages: Iterable[Mapping[str, Any]],
    system: Any = None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """Render chat messages with a fixed template, ending with the assistant turn.

    ``continue_final_message`` leaves the last message open (no end marker) so the
    output continues it; ``add_generation_prompt=False`` leaves the assistant turn out.
    """
    lines: list[str] = []
    if system is not None:
        lines.append(f"<|system|> {_content_text(system)} <|end|>")
    for message in messages:
        role = _safe_kind(str(message.get("role", "user")))
        lines.append(f"<|{role}|> {_content_text(message.get('content', ''))} <|end|>")
    if continue_final_message and lines:
        lines[-1] = lines[-1].removesuffix(" <|end|>")
    elif add_generation_prompt:
        lines.append("<|assistant|>")
    return "\n".join(lines)


def output_token_ids(prompt_ids: Sequence[int], count: int, seed: int | None = None) -> list[int]:
    """The deterministic continuation of a prompt: same prompt, same answer."""
    base = seed if seed is not None else zlib.crc32(repr(prompt_ids[-64:]).encode())
    n = len(_OUTPUT_WORDS)
    return [_OUTPUT_BASE + (base + i * 7919) % n for i in range(count)]


def decode_token(token_id: int, first: bool) -> str:
    word = _OUTPUT_WORDS[(token_id - _OUTPUT_BASE) % len(_OUTPUT_WORDS)]
    return word if first else " " + word
