"""``POST /v1/messages`` (the Anthropic Messages shape vLLM also serves)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..engine import EngineError, GenerationParams, Run
from ..tokens import chat_prompt, tokenize
from .base import common_params, optional_int, require_list, sse

__all__ = ["Messages"]

_STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}


def _usage(run: Run, output_tokens: int | None = None) -> dict[str, Any]:
    # As vLLM: input_tokens excludes cache reads, and the cache field exists only when
    # the engine reports cached tokens at all (--enable-prompt-tokens-details).
    usage: dict[str, Any] = {
        "input_tokens": run.prompt_tokens,
        "output_tokens": run.completion_tokens if output_tokens is None else output_tokens,
    }
    if run.reports_cached_tokens:
        usage["input_tokens"] = max(0, run.prompt_tokens - run.cached_tokens)
        usage["cache_read_input_tokens"] = run.cached_tokens
    return usage


class Messages:
    path = "/v1/messages"
    id_prefix = "msg_"

    def parse(self, body: Mapping[str, Any]) -> GenerationParams:
        messages = require_list(body, "messages")
        max_tokens = optional_int(body, "max_tokens", minimum=1)
        if max_tokens is None:
            raise EngineError("'max_tokens' is required.")
        prompt = tokenize(chat_prompt(messages, body.get("system")))
        return common_params(body, prompt, max_tokens, stop_key="stop_sequences")

    def response(self, run: Run, model: str, response_id: str, created: int) -> dict[str, Any]:
        return {
            "id": response_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": run.text}],
            "stop_reason": _STOP_REASONS.get(run.finish_reason or "", "end_turn"),
            "stop_sequence": None,
            "usage": _usage(run),
            "kv_transfer_params": run.kv_transfer_params,
        }

    def renderer(self, run: Run, model: str, response_id: str, created: int) -> _MessageStream:
        return _MessageStream(run, model, response_id)


@dataclass
class _MessageStream:
    run: Run
    model: str
    response_id: str

    def start(self) -> list[bytes]:
        message: dict[str, Any] = {
            "id": self.response_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(self.run, output_tokens=0),
        }
        block = {"type": "text", "text": ""}
        return [
            sse({"type": "message_start", "message": message}, event="message_start"),
            sse(
                {"type": "content_block_start", "index": 0, "content_block": block},
                event="content_block_start",
            ),
            sse({"type": "ping"}, event="ping"),
        ]

    def token(self, token_id: int, piece: str) -> list[bytes]:
        delta = {"type": "text_delta", "text": piece}
        return [
            sse(
                {"type": "content_block_delta", "index": 0, "delta": delta},
                event="content_block_delta",
            )
        ]

    def end(self) -> list[bytes]:
        reason = _STOP_REASONS.get(self.run.finish_reason or "", "end_turn")
        return [
            sse({"type": "content_block_stop", "index": 0}, event="content_block_stop"),
            sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": None},
                    "usage": _usage(self.run),
                },
                event="message_delta",
            ),
            sse({"type": "message_stop"}, event="message_stop"),
        ]

    def error(self, message: str, code: int) -> list[bytes]:
        kind = "invalid_request_error" if code == 400 else "api_error"
        payload = {"type": "error", "error": {"type": kind, "message": message}}
        return [sse(payload, event="error")]
