"""``POST /inference/v1/generate`` (vLLM's token-in, token-out endpoint)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..engine import EngineError, GenerationParams, Run
from ..tokens import tokenize
from .base import common_params, error_info, optional_int, sse

__all__ = ["Generate"]


def _prompt_ids(body: Mapping[str, Any]) -> list[int]:
    ids = body.get("token_ids")
    if ids is not None:
        if (
            isinstance(ids, list)
            and ids
            and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
        ):
            return list(ids)
        raise EngineError("'token_ids' must be a non-empty list of integers.")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return tokenize(prompt)
    raise EngineError("'token_ids' is required.")


class Generate:
    path = "/inference/v1/generate"
    id_prefix = "gen-"

    def parse(self, body: Mapping[str, Any]) -> GenerationParams:
        sampling = body.get("sampling_params") or {}
        if not isinstance(sampling, Mapping):
            raise EngineError("'sampling_params' must be an object.")
        max_tokens = optional_int(sampling, "max_tokens", minimum=1)
        return common_params(body, _prompt_ids(body), max_tokens, sampling=sampling)

    def response(self, run: Run, model: str, response_id: str, created: int) -> dict[str, Any]:
        return {
            "request_id": response_id,
            "choices": [
                {
                    "index": 0,
                    "token_ids": list(run.output_ids),
                    "finish_reason": run.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": run.usage(),
            "prompt_logprobs": None,
            "kv_transfer_params": run.kv_transfer_params,
        }

    def renderer(self, run: Run, model: str, response_id: str, created: int) -> _GenerateStream:
        return _GenerateStream(run, response_id)


@dataclass
class _GenerateStream:
    run: Run
    response_id: str

    def _chunk(self, token_ids: list[int], finish_reason: str | None, **extra: Any) -> bytes:
        choice = {
            "index": 0,
            "token_ids": token_ids,
            "finish_reason": finish_reason,
            "logprobs": None,
        }
        return sse({"request_id": self.response_id, "choices": [choice], **extra})

    def start(self) -> list[bytes]:
        return []

    def token(self, token_id: int, piece: str) -> list[bytes]:
        return [self._chunk([token_id], None)]

    def end(self) -> list[bytes]:
        extra: dict[str, Any] = {}
        if self.run.params.include_usage:
            extra["usage"] = self.run.usage()
        return [self._chunk([], self.run.finish_reason, **extra), b"data: [DONE]\n\n"]

    def error(self, message: str, code: int) -> list[bytes]:
        return [sse({"error": error_info(message, code)}), b"data: [DONE]\n\n"]
