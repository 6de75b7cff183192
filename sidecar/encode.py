"""The encode stage of E/P/D (reference section 4): multimodal items to the encoders.

Per request naming encoders (``x-encoder-hosts-ports``):

1. the distinct multimodal items of ``messages[].content[]`` (parts of type
   ``image_url``, ``audio_url``, ``video_url``, ``input_audio``; one item per distinct
   URL or inline data); a text-only request skips the stage;
2. one encode request per item (a chat completion holding one user message with that
   single item, ``max_tokens=1``, ``stream=false``, the request's model), spread round
   robin over the encoders and sent in parallel; each is retried on the next encoder
   after a connection error or a 502/503/504, within ``--prefill-max-retries``;
3. the first failure cancels the other encodes and fails the request (502, stage
   ``encode``);
4. ``ec-nixl``: every answer must carry ``ec_transfer_params`` (mm_hash -> descriptor);
   the maps are merged (two different descriptors for one hash are an error) and
   returned as the top-level ``ec_transfer_params`` of the next leg. ``ec-example`` and
   ``ec-shared-storage`` (llm-d's coordinator name for the same topology): encoders
   write their outputs to storage the consumers share, keyed by mm_hash; their answers
   are only checked for success and nothing goes on the wire.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from multidict import CIMultiDict

from common import deadlines
from common.json_codec import dumps, loads
from common.multimodal import MULTIMODAL_PART_TYPES
from sidecar.errors import EncodeError, EncodeTimeout, SidecarError
from sidecar.exchange import Exchange
from sidecar.headers import TRACEPARENT
from sidecar.metrics import Metrics
from sidecar.routing import HostPort
from sidecar.upstream import Retryable, StageErrors, Upstream

__all__ = [
    "EC_CONNECTORS",
    "STORAGE_CONNECTORS",
    "EncodePolicy",
    "EncoderStage",
    "encode_request_body",
    "merge_transfer_params",
    "multimodal_items",
]

EC_CONNECTORS = ("ec-example", "ec-nixl", "ec-shared-storage")
# Encoders share their outputs through storage: no ec_transfer_params on the wire.
STORAGE_CONNECTORS = frozenset({"ec-example", "ec-shared-storage"})
ENCODE_PATH = "/v1/chat/completions"
PARAMS_FIELD = "ec_transfer_params"
_MAX_ANSWER = 4 * 1024 * 1024
_ENCODE_ERRORS = StageErrors(
    timeout=lambda message: EncodeTimeout(message, "timeout"),
    failed=EncodeError,
    too_large_reason="too_large",
)


def _identity(part: Mapping[str, Any]) -> str:
    """What makes two parts the same item: their type and URL (or inline data)."""
    kind = str(part["type"])
    inner = part.get(kind)
    if isinstance(inner, str):
        return f"{kind}:{inner}"
    if isinstance(inner, Mapping):
        source = inner.get("url", inner.get("data"))
        if isinstance(source, str):
            return f"{kind}:{source}"
    return f"{kind}:{dumps(inner).decode()}"


def multimodal_items(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The distinct multimodal content parts of a chat body, in order of first appearance."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    items: dict[str, dict[str, Any]] = {}
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") in MULTIMODAL_PART_TYPES:
                items.setdefault(_identity(part), part)
    return list(items.values())


def encode_request_body(body: Mapping[str, Any], item: Mapping[str, Any]) -> dict[str, Any]:
    request: dict[str, Any] = {
        "messages": [{"role": "user", "content": [dict(item)]}],
        "max_tokens": 1,
        "stream": False,
    }
    if "model" in body:
        request["model"] = body["model"]
    return request


def merge_transfer_params(maps: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Union of the encoders' maps; one hash with two different descriptors is an error."""
    merged: dict[str, Any] = {}
    for params in maps:
        for mm_hash, descriptor in params.items():
            if mm_hash in merged and merged[mm_hash] != descriptor:
                raise EncodeError(
                    f"encoders returned conflicting ec_transfer_params for item {mm_hash}",
                    "conflict",
                )
            merged[mm_hash] = descriptor
    return merged


@dataclass(frozen=True, slots=True)
class EncodePolicy:
    connector: Literal["ec-example", "ec-nixl", "ec-shared-storage"]
    timeout: float = 300.0  # per encode request, all attempts
    max_retries: int = 3
    retry_backoff: float = 0.1


class EncoderStage:
    """Implements ``connectors.EncodeStage`` over one client session (the encode stage's)."""

    def __init__(self, upstream: Upstream, policy: EncodePolicy, metrics: Metrics) -> None:
        self.upstream = upstream
        self.policy = policy
        self.metrics = metrics
        self._next = itertools.count()  # round robin across requests, not only within one

    async def run(
        self,
        body: Mapping[str, Any],
        encoders: list[HostPort],
        headers: CIMultiDict[str],
        ex: Exchange,
    ) -> Mapping[str, Any]:
        items = multimodal_items(body)
        if not items:
            return {}
        started = time.perf_counter()
        ex.encode_items = len(items)
        self.metrics.encode_items.inc(len(items))
        start = next(self._next)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._encode(body, item, encoders, start + i, headers, ex))
                    for i, item in enumerate(items)
                ]
            answers = [task.result() for task in tasks]
            if self.policy.connector in STORAGE_CONNECTORS:
                return {}
            return {PARAMS_FIELD: merge_transfer_params(answers)}
        except BaseExceptionGroup as group_error:
            # The first failure cancelled the other encodes; report that one.
            first = group_error.exceptions[0]
            if not isinstance(first, SidecarError):
                raise
            reason = first.reason if isinstance(first, EncodeError) else "error"
            self.metrics.encode_failures.labels(reason=reason).inc()
            raise first from None
        except EncodeError as error:
            self.metrics.encode_failures.labels(reason=error.reason).inc()
            raise
        finally:
            ex.encode_s = time.perf_counter() - started
            self.metrics.encode_seconds.observe(ex.encode_s)

    async def _encode(
        self,
        body: Mapping[str, Any],
        item: Mapping[str, Any],
        encoders: list[HostPort],
        slot: int,
        headers: CIMultiDict[str],
        ex: Exchange,
    ) -> Mapping[str, Any]:
        payload = dumps(encode_request_body(body, item))
        attempts = 1 + self.policy.max_retries
        backoff = self.policy.retry_backoff
        try:
            async with deadlines.timeout(self.policy.timeout):
                for attempt in range(attempts):
                    target = encoders[(slot + attempt) % len(encoders)]
                    try:
                        return await self._send(target, payload, headers, ex)
                    except Retryable as exc:
                        if attempt + 1 == attempts:
                            raise exc.error from None
                        self.metrics.encode_retries.labels(reason=exc.error.reason).inc()
                        await asyncio.sleep(backoff * 2**attempt + random.uniform(0, backoff))
        except TimeoutError:
            raise EncodeTimeout(
                f"encode gave no answer within {self.policy.timeout:g}s", "timeout"
            ) from None
        raise AssertionError("unreachable: every attempt returns or raises")

    async def _send(
        self, target: HostPort, payload: bytes, headers: CIMultiDict[str], ex: Exchange
    ) -> Mapping[str, Any]:
        leg_headers = headers.copy()
        leg_headers[TRACEPARENT] = ex.trace.leg_header()
        url = target.base_url + ENCODE_PATH
        fetched = await self.upstream.fetch(
            url,
            leg_headers,
            payload,
            target=str(target),
            errors=_ENCODE_ERRORS,
            limit=_MAX_ANSWER,
            timeout=None,  # the bound is over every attempt (see _encode)
        )
        status, answer = fetched.status, fetched.body
        if not 200 <= status < 300:
            detail = answer[:300].decode(errors="replace")
            raise EncodeError(f"encoder {target} answered {status}: {detail}", f"status_{status}")
        try:
            parsed = loads(answer)
        except ValueError:
            raise EncodeError(f"encoder {target} answered malformed JSON", "malformed") from None
        if self.policy.connector in STORAGE_CONNECTORS:
            return {}
        params = parsed.get(PARAMS_FIELD) if isinstance(parsed, Mapping) else None
        if not isinstance(params, Mapping) or not params:
            raise EncodeError(
                f"encoder {target} answered without {PARAMS_FIELD} (ec-nixl expects them)",
                "missing_ec_transfer_params",
            )
        return params
