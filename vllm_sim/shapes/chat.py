"""``POST /v1/chat/completions`` (OpenAI chat shape, as vLLM serves it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..engine import EngineError, GenerationParams, Run
from ..tokens import chat_prompt, multimodal_items, tokenize
from .base import OpenAIChunkStream, common_params, optional_int, require_list

__all__ = ["ChatCompletions"]


class ChatCompletions:
    path = "/v1/chat/completions"
    id_prefix = "chatcmpl-"

    def parse(self, body: Mapping[str, Any]) -> GenerationParams:
        messages = require_list(body, "messages")
        max_tokens = optional_int(body, "max_completion_tokens", minimum=1)
        if max_tokens is None:
            max_tokens = optional_int(body, "max_tokens", minimum=1)
        add_prompt = body.get("add_generation_prompt", True)
        continue_final = body.get("continue_final_message", False)
        if not isinstance(add_prompt, bool) or not isinstance(continue_final, bool):
            raise EngineError(
                "'add_generation_prompt' and 'continue_final_message' must be booleans."
            )
        if add_prompt and continue_final:
            raise EngineError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        last = messages[-1]
        if continue_final and (not isinstance(last, Mapping) or last.get("role") != "assistant"):
            raise EngineError("continue_final_message needs a final assistant message.")
        text = chat_prompt(
            messages, add_generation_prompt=add_prompt, continue_final_message=continue_final
        )
        params = common_params(body, tokenize(text), max_tokens)
        params.continuation = continue_final and bool(last.get("content"))
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


class _ChatStream(OpenAIChunkStream):
    object_name = "chat.completion.chunk"

    def choice(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "index": 0,
            "delta": {"content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }

    def start(self) -> list[bytes]:
        first = {**self.choice(""), "delta": {"role": "assistant", "content": ""}}
        return [self.chunk([first])]
