"""Per-API facts: output-length fields, where usage reports cached tokens, how answers end.

Only the paths listed here get P/D treatment; everything else passes through.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = ["API_SHAPES", "ApiShape", "Finish", "shape_for"]

# Where a usage object can sit inside a JSON body or an SSE event's data: at the top,
# inside a Responses API "response.completed" event, or an Anthropic "message_start".
_USAGE_HOLDERS: tuple[tuple[str, ...], ...] = ((), ("response",), ("message",))


class Finish(enum.Enum):
    """How a (prefill) answer ended, whatever the API calls it."""

    LENGTH = "length"  # stopped at the output cap: vLLM hands over the KV
    STOPPED = "stopped"  # generation is complete (EOS, a stop string or token)
    OTHER = "other"  # aborted, errored, declined, or not said


# Finish reasons that mean "generation is complete", per API vocabulary: OpenAI shapes
# (choices[].finish_reason), Anthropic (stop_reason) and the Responses API (status).
_STOPPED = frozenset({"stop", "tool_calls", "end_turn", "stop_sequence", "tool_use"})
_LENGTH = frozenset({"length", "max_tokens"})


@dataclass(frozen=True, slots=True)
class ApiShape:
    path: str
    # Output-length fields forced to 1 on the prefill leg; the first one is always set,
    # the others only when the client sent them.
    cap_fields: tuple[str, ...]
    # Nested object holding the cap fields (generate's sampling_params), created if absent.
    cap_container: str | None
    # Path to the cached-token count inside a usage object.
    cached_tokens: tuple[str, ...]
    # Bytes every usage object of this API contains (cheap pre-filter for SSE events).
    usage_marker: bytes
    # Anthropic's input_tokens excludes cache reads: it moves when the cached count does.
    input_excludes_cached: str | None = None

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
            value = _dig(usage, self.cached_tokens)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    def write_cached(self, payload: object, value: int) -> bool:
        """Set the cached-token count in every usage object of ``payload``; True if any.

        A usage object without the field gets it: vLLM leaves it out when the engine runs
        without ``--enable-prompt-tokens-details`` (and some versions when it is 0), and
        a count left out reads as "whatever the decode engine's view was".
        """
        changed = False
        *parents, leaf = self.cached_tokens
        for usage in self._usages(payload):
            node: dict[str, Any] = usage
            for key in parents:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = {}
                    node[key] = child
                node = child
            before = node.get(leaf)
            node[leaf] = value
            if self.input_excludes_cached is not None:
                self._move_input(usage, before if _is_count(before) else 0, value)
            changed = True
        return changed

    def _move_input(self, usage: dict[str, Any], before: Any, after: int) -> None:
        key = self.input_excludes_cached
        assert key is not None
        tokens = usage.get(key)
        if _is_count(tokens):
            usage[key] = max(0, tokens + before - after)

    def finish(self, payload: object) -> Finish:
        """How a complete (non-streamed) answer ended; LENGTH if any choice hit the cap."""
        if not isinstance(payload, dict):
            return Finish.OTHER
        reasons: list[object] = []
        choices = payload.get("choices")
        if isinstance(choices, list):
            reasons = [c.get("finish_reason") for c in choices if isinstance(c, dict)]
        elif "stop_reason" in payload:  # Anthropic messages
            reasons = [payload.get("stop_reason")]
        elif "status" in payload:  # Responses API
            status = payload.get("status")
            details = payload.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, dict) else None
            if status == "completed":
                reasons = ["stop"]
            elif status == "incomplete" and reason == "max_output_tokens":
                reasons = ["length"]
            else:
                reasons = [status]
        if not reasons:
            return Finish.OTHER
        if any(r in _LENGTH for r in reasons):
            return Finish.LENGTH
        if all(r in _STOPPED for r in reasons):
            return Finish.STOPPED
        return Finish.OTHER

    def _usages(self, payload: object) -> list[dict[str, Any]]:
        if not isinstance(payload, dict):
            return []
        found = []
        for holder in _USAGE_HOLDERS:
            container = _dig(payload, holder)
            if isinstance(container, dict):
                usage = container.get("usage")
                if isinstance(usage, dict):
                    found.append(usage)
        return found


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
            b'"prompt_tokens"',
        ),
        ApiShape("/v1/completions", ("max_tokens",), None, _OPENAI_CACHED, b'"prompt_tokens"'),
        ApiShape(
            "/v1/responses",
            ("max_output_tokens",),
            None,
            ("input_tokens_details", "cached_tokens"),
            b'"input_tokens"',
        ),
        ApiShape(
            "/v1/messages",
            ("max_tokens",),
            None,
            ("cache_read_input_tokens",),
            b'"input_tokens"',
            input_excludes_cached="input_tokens",
        ),
        ApiShape(
            "/inference/v1/generate",
            ("max_tokens",),
            "sampling_params",
            _OPENAI_CACHED,
            b'"prompt_tokens"',
        ),
    )
}


def shape_for(path: str) -> ApiShape | None:
    return API_SHAPES.get(path)
