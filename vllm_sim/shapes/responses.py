"""``POST /v1/responses`` (OpenAI Responses shape; streamed as typed events)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine import EngineError, GenerationParams, Run
from ..tokens import chat_prompt, tokenize
from .base import common_params, optional_int, sse

__all__ = ["Responses"]


def _messages(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    raw = body.get("input")
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if isinstance(raw, list) and raw and all(isinstance(m, Mapping) for m in raw):
        return [m for m in raw if m.get("type", "message") == "message"]
    raise EngineError("'input' must be a string or a non-empty list of input items.")


def _usage(run: Run) -> dict[str, Any]:
    return {
        "input_tokens": run.prompt_tokens,
        "input_tokens_details": {"cached_tokens": run.cached_tokens},
        "output_tokens": run.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": run.prompt_tokens + run.completion_tokens,
    }


def _message_item(run: Run, response_id: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{response_id}",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": run.text, "annotations": [], "logprobs": []}],
    }


def _response(run: Run, model: str, response_id: str, created: int, status: str) -> dict[str, Any]:
    done = status != "in_progress"
    incomplete = done and run.finish_reason == "length"
    final_status = "incomplete" if incomplete else status
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "model": model,
        "status": final_status,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "output": [_message_item(run, response_id, "completed")] if done else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": _usage(run) if done else None,
        "kv_transfer_params": run.kv_transfer_params if done else None,
    }


class Responses:
    path = "/v1/responses"
    id_prefix = "resp_"

    def parse(self, body: Mapping[str, Any]) -> GenerationParams:
        messages = _messages(body)
        system = body.get("instructions")
        max_tokens = optional_int(body, "max_output_tokens", minimum=1)
        return common_params(body, tokenize(chat_prompt(messages, system)), max_tokens)

    def response(self, run: Run, model: str, response_id: str, created: int) -> dict[str, Any]:
        return _response(run, model, response_id, created, "completed")

    def renderer(self, run: Run, model: str, response_id: str, created: int) -> _ResponseStream:
        return _ResponseStream(run, model, response_id, created)


@dataclass
class _ResponseStream:
    run: Run
    model: str
    response_id: str
    created: int
    _seq: int = field(default=0)

    def _event(self, kind: str, **payload: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **payload}
        self._seq += 1
        return sse(data, event=kind)

    def _where(self) -> dict[str, Any]:
        return {"item_id": f"msg_{self.response_id}", "output_index": 0, "content_index": 0}

    def start(self) -> list[bytes]:
        snapshot = _response(self.run, self.model, self.response_id, self.created, "in_progress")
        item = _message_item(self.run, self.response_id, "in_progress")
        item["content"] = []
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
            self._event("response.output_item.added", output_index=0, item=item),
            self._event("response.content_part.added", part=part, **self._where()),
        ]

    def token(self, token_id: int, piece: str) -> list[bytes]:
        return [
            self._event("response.output_text.delta", delta=piece, logprobs=[], **self._where())
        ]

    def end(self) -> list[bytes]:
        final = _response(self.run, self.model, self.response_id, self.created, "completed")
        item = _message_item(self.run, self.response_id, "completed")
        part = item["content"][0]
        return [
            self._event(
                "response.output_text.done", text=self.run.text, logprobs=[], **self._where()
            ),
            self._event("response.content_part.done", part=part, **self._where()),
            self._event("response.output_item.done", output_index=0, item=item),
            self._event("response.completed", response=final),
        ]

    def error(self, message: str, code: int) -> list[bytes]:
        return [self._event("error", code=str(code), message=message, param=None)]
