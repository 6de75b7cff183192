"""``POST /v1/completions`` (OpenAI legacy completions shape)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..engine import EngineError, GenerationParams, Run
from ..tokens import tokenize
from .base import OpenAIChunkStream, common_params, optional_int

__all__ = ["Completions"]


def _prompt_ids(prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        return tokenize(prompt)
    if isinstance(prompt, list) and len(prompt) == 1:
        return _prompt_ids(prompt[0])
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return list(prompt)
    raise EngineError("'prompt' must be a string, a list with one string, or a list of token ids.")


class Completions:
    path = "/v1/completions"
    id_prefix = "cmpl-"

    def parse(self, body: Mapping[str, Any]) -> GenerationParams:
        if "prompt" not in body:
            raise EngineError("'prompt' is required.")
        max_tokens = optional_int(body, "max_tokens", minimum=1)
        # The completions API defaults to 16 output tokens.
        return common_params(
            body, _prompt_ids(body["prompt"]), 16 if max_tokens is None else max_tokens
        )

    def response(self, run: Run, model: str, response_id: str, created: int) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "text": run.text,
            "logprobs": None,
            "finish_reason": run.finish_reason,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        if run.params.return_token_ids:
            choice["prompt_token_ids"] = list(run.params.prompt_ids)
            choice["token_ids"] = list(run.output_ids)
        return {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": run.usage(),
            "kv_transfer_params": run.kv_transfer_params,
        }

    def renderer(self, run: Run, model: str, response_id: str, created: int) -> _CompletionStream:
        return _CompletionStream(run, model, response_id, created)


class _CompletionStream(OpenAIChunkStream):
    object_name = "text_completion"

    def choice(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
