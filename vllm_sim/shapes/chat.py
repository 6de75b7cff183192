"""``POST /v1/chat/completions`` (OpenAI chat shape, as vLLM serves it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..engine import GenerationParams, Run
from ..tokens import chat_prompt, multimodal_items, tokenize
from .base import common_params, error_info, optional_int, require_list, sse

__all__ = ["ChatCompletions"]


class ChatCompletions:
    path = "/v1/chat/completions"
    id_prefix = "chatcmpl-"

    def parse(self, body: Mapping[str, Any]) -> GenerationParams:
        messages = require_list(body, "messages")
        max_tokens = optional_int(body, "max_completion_tokens", minimum=1)
        if max_tokens is None:
            max_tokens = optional_int(body, "max_tokens", minimum=1)
        params = common_params(body, tokenize(chat_prompt(messages)), max_tokens)
        params.mm_items = multimodal_items(messages)
        return params

    def response(self, run: Run, model: str, response_id: str, created: int) -> dict[str, Any]:
        payload = {
            "id": response_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": run.text, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": run.finish_reason,
                    "stop_reason": None,
                }
            ],
            "usage": run.usage(),
            "prompt_logprobs": None,
            "kv_transfer_params": run.kv_transfer_params,
        }
        if run.ec_transfer_params is not None:
            payload["ec_transfer_params"] = run.ec_transfer_params
        return payload

    def renderer(self, run: Run, model: str, response_id: str, created: int) -> _ChatStream:
        return _ChatStream(run, model, response_id, created)


@dataclass
class _ChatStream:
    run: Run
    model: str
    response_id: str
    created: int

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse(
            {
                "id": self.response_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": choices,
                **extra,
            }
        )

    def start(self) -> list[bytes]:
        delta = {"role": "assistant", "content": ""}
        return [
            self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
        ]

    def token(self, token_id: int, piece: str) -> list[bytes]:
        choice = {"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}
        return [self._chunk([choice])]

    def end(self) -> list[bytes]:
        final = {
            "index": 0,
            "delta": {"content": ""},
            "logprobs": None,
            "finish_reason": self.run.finish_reason,
            "stop_reason": None,
        }
        out = [self._chunk([final])]
        if self.run.params.include_usage:
            out.append(self._chunk([], usage=self.run.usage()))
        out.append(b"data: [DONE]\n\n")
        return out

    def error(self, message: str, code: int) -> list[bytes]:
        return [sse({"error": error_info(message, code)}), b"data: [DONE]\n\n"]
