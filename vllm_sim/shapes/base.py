"""What every API shape provides: body -> GenerationParams, run -> JSON or SSE events."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..engine import EngineError, GenerationParams, Run

__all__ = [
    "ApiShape",
    "OpenAIChunkStream",
    "StreamRenderer",
    "common_params",
    "error_info",
    "optional_int",
    "sse",
]


def sse(data: Mapping[str, Any] | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


class StreamRenderer(Protocol):
    def start(self) -> list[bytes]: ...

    def token(self, token_id: int, piece: str) -> list[bytes]: ...

    def end(self) -> list[bytes]: ...

    def error(self, message: str, code: int) -> list[bytes]: ...


class ApiShape(Protocol):
    path: str
    id_prefix: str

    def parse(self, body: Mapping[str, Any]) -> GenerationParams: ...

    def response(self, run: Run, model: str, response_id: str, created: int) -> dict[str, Any]: ...

    def renderer(self, run: Run, model: str, response_id: str, created: int) -> StreamRenderer: ...


def error_info(message: str, code: int) -> dict[str, Any]:
    """vLLM's error object (the value of the top-level ``error`` key)."""
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(code, "InternalServerError")
    return {"message": message, "type": kind, "param": None, "code": code}


def optional_int(body: Mapping[str, Any], key: str, *, minimum: int = 0) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise EngineError(f"'{key}' must be an integer, got {type(value).__name__}.")
    if value < minimum:
        raise EngineError(f"'{key}' must be at least {minimum}, got {value}.")
    return value


def _stop_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise EngineError(f"'{key}' must be a string or a list of strings.")


def common_params(
    body: Mapping[str, Any],
    prompt_ids: list[int],
    max_tokens: int | None,
    *,
    sampling: Mapping[str, Any] | None = None,
    stop_key: str = "stop",
) -> GenerationParams:
    """The fields every shape shares; ``sampling`` holds them when nested (generate)."""
    s = body if sampling is None else sampling
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise EngineError("'stream' must be a boolean.")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise EngineError("'stream_options' must be an object.")
    ktp = body.get("kv_transfer_params")
    if ktp is not None and not isinstance(ktp, Mapping):
        raise EngineError("'kv_transfer_params' must be an object.")
    ignore_eos = s.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise EngineError("'ignore_eos' must be a boolean.")
    ec_params = body.get("ec_transfer_params")
    if ec_params is not None and not isinstance(ec_params, Mapping):
        raise EngineError("'ec_transfer_params' must be an object.")
    threshold = body.get("cache_hit_threshold")
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not 0 <= threshold <= 1
    ):
        raise EngineError("'cache_hit_threshold' must be a number between 0 and 1.")
    stop_ids = s.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
    ):
        raise EngineError("'stop_token_ids' must be a list of integers.")
    host = body.get("bootstrap_host")
    if host is not None and not isinstance(host, str):
        raise EngineError("'bootstrap_host' must be a string.")
    return GenerationParams(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        min_tokens=optional_int(s, "min_tokens") or 0,
        stop=_stop_list(s.get(stop_key), stop_key),
        stop_token_ids=list(stop_ids),
        return_token_ids=body.get("return_token_ids") is True,
        ignore_eos=ignore_eos,
        stream=bool(stream),
        include_usage=bool(options and options.get("include_usage")),
        kv_transfer_params=dict(ktp) if ktp is not None else None,
        seed=optional_int(s, "seed"),
        bootstrap_host=host,
        bootstrap_port=optional_int(body, "bootstrap_port"),
        bootstrap_room=optional_int(body, "bootstrap_room"),
        cache_hit_threshold=None if threshold is None else float(threshold),
        ec_transfer_params=dict(ec_params) if ec_params is not None else None,
    )


def require_list(body: Mapping[str, Any], key: str) -> list[Any]:
    value = body.get(key)
    if not isinstance(value, list) or not value:
        raise EngineError(f"'{key}' must be a non-empty list.")
    for item in value:
        if not isinstance(item, Mapping):
            raise EngineError(f"every item of '{key}' must be an object.")
    return value


DONE = b"data: [DONE]\n\n"


@dataclass
class OpenAIChunkStream:
    """The OpenAI chunk stream (chat and completions): one ``choices`` delta per token,
    a final chunk with the finish reason, an optional usage chunk, then ``[DONE]``."""

    object_name: ClassVar[str]
    run: Run
    model: str
    response_id: str
    created: int

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse(
            {
                "id": self.response_id,
                "object": self.object_name,
                "created": self.created,
                "model": self.model,
                "choices": choices,
                **extra,
            }
        )

    def choice(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def start(self) -> list[bytes]:
        return []

    def token(self, token_id: int, piece: str) -> list[bytes]:
        return [self.chunk([self.choice(piece)])]

    def end(self) -> list[bytes]:
        out = [self.chunk([self.choice("", self.run.finish_reason)])]
        if self.run.params.include_usage:
            out.append(self.chunk([], usage=self.run.usage()))
        out.append(DONE)
        return out

    def error(self, message: str, code: int) -> list[bytes]:
        return [sse({"error": error_info(message, code)}), DONE]
