"""Per-API facts: which body fields cap output length and where usage reports cached tokens.

Only the paths listed here get P/D treatment; everything else passes through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["API_SHAPES", "ApiShape", "shape_for"]

# Where a usage object can sit inside a JSON body or an SSE event's data: at the top,
# inside a Responses API "response.completed" event, or an Anthropic "message_start".
_USAGE_HOLDERS: tuple[tuple[str, ...], ...] = ((), ("response",), ("message",))


@dataclass(frozen=True, slots=True)
class ApiShape:
    path: str
    # Output-length fields forced to 1 on the prefill leg; the first one is always set,
    # the others only when the client sent them.
    cap_fields: tuple[str, ...]
    # Nested object holding the cap fields (generate's sampling_params), created if absent.
    cap_container: str | None
    # Path to the cached-token count inside a usage object; None: the API has none.
    cached_tokens: tuple[str, ...] | None
    # Bytes that must occur in an SSE event carrying the cached count (cheap pre-filter).
    cached_marker: bytes

    def cap_target(self, body: dict[str, Any]) -> dict[str, Any]:
        """The (copied) object whose cap fields are edited on the prefill leg."""
        if self.cap_container is None:
            return body
        inner = body.get(self.cap_container)
        inner = dict(inner) if isinstance(inner, dict) else {}
        body[self.cap_container] = inner
        return inner

    def read_cached(self, payload: object) -> int | None:
        """The cached-token count reported by a response body or event, if any."""
        for usage in self._usages(payload):
            value = _dig(usage, self.cached_tokens or ())
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    def write_cached(self, payload: object, value: int) -> bool:
        """Overwrite the cached-token count wherever ``payload`` reports one; True if any.

        Only existing counts are replaced: a response that reports no cached tokens
        claims nothing that needs correcting.
        """
        if self.cached_tokens is None:
            return False
        changed = False
        *parents, leaf = self.cached_tokens
        for usage in self._usages(payload):
            node = _dig(usage, tuple(parents))
            if isinstance(node, dict) and leaf in node:
                node[leaf] = value
                changed = True
        return changed

    def _usages(self, payload: object) -> list[dict[str, Any]]:
        if self.cached_tokens is None or not isinstance(payload, dict):
            return []
        found = []
        for holder in _USAGE_HOLDERS:
            container = _dig(payload, holder)
            if isinstance(container, dict):
                usage = container.get("usage")
                if isinstance(usage, dict):
                    found.append(usage)
        return found


def _dig(node: object, keys: tuple[str, ...]) -> object:
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


_OPENAI_CACHED = ("prompt_tokens_details", "cached_tokens")

API_SHAPES: dict[str, ApiShape] = {
    shape.path: shape
    for shape in (
        ApiShape(
            "/v1/chat/completions",
            ("max_tokens", "max_completion_tokens"),
            None,
            _OPENAI_CACHED,
            b'"cached_tokens"',
        ),
        ApiShape("/v1/completions", ("max_tokens",), None, _OPENAI_CACHED, b'"cached_tokens"'),
        ApiShape(
            "/v1/responses",
            ("max_output_tokens",),
            None,
            ("input_tokens_details", "cached_tokens"),
            b'"cached_tokens"',
        ),
        ApiShape(
            "/v1/messages",
            ("max_tokens",),
            None,
            ("cache_read_input_tokens",),
            b'"cache_read_input_tokens"',
        ),
        ApiShape(
            "/inference/v1/generate",
            ("max_tokens",),
            "sampling_params",
            _OPENAI_CACHED,
            b'"cached_tokens"',
        ),
    )
}


def shape_for(path: str) -> ApiShape | None:
    return API_SHAPES.get(path)
