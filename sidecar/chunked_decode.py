"""Chunked decode (``--decode-chunk-size N``): a long generation as a run of short ones.

A chat completion whose output budget (``max_completion_tokens``, else ``max_tokens``)
exceeds N, or that sets none, is decoded as a sequence of non-streamed requests to the
local engine, each capped at N tokens, so one request never holds a decode slot for its
whole budget. As llm-d's sidecar does:

* only ``/v1/chat/completions`` is chunked; every other API, and a chat request whose
  budget is at most N, goes to the engine unchanged;
* chunk 1 is the decode leg's body as it would have been sent (with the prefill's
  ``kv_transfer_params`` on the P/D path); from chunk 2 on, the text generated so far is
  the final assistant message, with ``continue_final_message=true`` and
  ``add_generation_prompt=false``, and the KV side-channel fields are dropped (the
  engine finds the prompt in its own prefix cache);
* it stops on a finish reason other than ``length``, when the budget is used up, or on a
  chunk that produced nothing.

Near the model's context length: a request with no budget is one unchunked vLLM would
let run to the end of the context and finish with ``length``. A chunk the engine refuses
because prompt, text so far and chunk exceed the context (a 400 saying "maximum context
length is L tokens" and how many input tokens the request has) is sent once more with
``max_tokens`` capped to the room left; a capped chunk that ends on ``length`` ends the
answer there. When no room is left, or the refusal does not say the numbers, the answer
ends with the text so far and ``finish_reason: "length"`` (JSON and SSE alike) instead of
an error. Only the first chunk's refusal, with no room at all (the prompt alone is over
the context), is relayed as the engine's error, as unchunked vLLM answers it.

Unlike llm-d, the text generated so far is one assistant message (appended to the
client's own final assistant message when the client itself continues it), not one
message per chunk; the answer has one id (the first chunk's) and intermediate chunks'
``length`` never reaches the client. Usage: ``prompt_tokens`` (and its details) are the
first chunk's, the client's prompt counted once; the re-sent generated text of later
chunks is not billed as prompt. ``completion_tokens`` is the sum over chunks.

Requests whose meaning chunking would change are refused with a 400 naming the field
(:func:`refuse_unchunkable`): ``n``/``best_of`` > 1, beam search, ``echo``,
``prompt_logprobs``, ``return_token_ids``, structured output (``response_format`` other
than text, ``structured_outputs``, ``guided_*``) and tools the model may call. Chat
``logprobs`` are concatenated over chunks.

This module is the body and stream translation (:class:`ChunkedDecode`) and the loop that
sends the chunks and answers the client (:func:`run_chunked`); the orchestrator supplies
how one chunk is sent.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from common.json_codec import dumps, loads
from sidecar import tracing
from sidecar.api_shapes import ApiShape
from sidecar.errors import DecodeError, NotChunkable, SidecarError
from sidecar.exchange import Exchange
from sidecar.headers import REQUEST_ID, response_headers
from sidecar.relay import error_event
from sidecar.server import Request, Response, StreamResponse

__all__ = [
    "CHAT_PATH",
    "ChunkAnswer",
    "ChunkedDecode",
    "NotChunkable",
    "Piece",
    "chunking_applies",
    "output_budget",
    "refuse_unchunkable",
    "run_chunked",
]

CHAT_PATH = "/v1/chat/completions"
# Dropped from chunk 2 on: they point the engine at the prefill's KV, already consumed.
_KV_FIELDS = ("kv_transfer_params", "bootstrap_host", "bootstrap_port", "bootstrap_room")
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def output_budget(body: Mapping[str, Any]) -> int | None:
    """The client's output budget: ``max_completion_tokens``, else ``max_tokens``; None
    when neither is a positive integer (the engine's own limit applies)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = _count(body.get(name))
        if value is not None and value > 0:
            return value
    return None


def chunking_applies(path: str, body: Mapping[str, Any], chunk_size: int) -> bool:
    """Whether this request is decoded in chunks of ``chunk_size`` tokens."""
    if chunk_size <= 0 or path != CHAT_PATH:
        return False
    budget = output_budget(body)
    return budget is None or budget > chunk_size


def refuse_unchunkable(path: str, body: Mapping[str, Any], chunk_size: int) -> None:
    """Raise :class:`NotChunkable` for a request that would be chunked but cannot be."""
    if not chunking_applies(path, body, chunk_size):
        return
    for name in ("n", "best_of"):
        value = _count(body.get(name))
        if value is not None and value > 1:
            raise NotChunkable(name, "only one choice can be continued")
    checks: tuple[tuple[str, bool, str], ...] = (
        ("use_beam_search", body.get("use_beam_search") is True, "beams cannot be continued"),
        ("echo", body.get("echo") is True, "every chunk would echo its own prompt"),
        (
            "prompt_logprobs",
            body.get("prompt_logprobs") is not None,
            "later chunks' prompts include generated text",
        ),
        ("return_token_ids", body.get("return_token_ids") is True, "token ids are not joined"),
        (
            "structured_outputs",
            body.get("structured_outputs") is not None,
            "a grammar restarts in every chunk",
        ),
    )
    for name, refused, why in checks:
        if refused:
            raise NotChunkable(name, why)
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") not in (None, "text"):
        raise NotChunkable("response_format", "a grammar restarts in every chunk")
    for name in _GUIDED:
        if body.get(name) is not None:
            raise NotChunkable(name, "a grammar restarts in every chunk")
    if body.get("tools") and body.get("tool_choice") != "none":
        raise NotChunkable("tools", "a tool call cut between chunks cannot be parsed")


_CONTEXT_LIMIT = re.compile(rb"maximum context length is (\d+)")
_INPUT_TOKENS = re.compile(rb"\((\d+) in the messages|request has (\d+) input tokens")


def is_context_refusal(status: int, body: bytes) -> bool:
    """Whether an engine's answer refuses a request for exceeding the model's context."""
    return status == 400 and b"context length" in body.lower()


def context_room(body: bytes) -> int | None:
    """The output tokens that fit, by the numbers of an engine's context-length refusal
    (vLLM's, or the simulator's), or None when it does not say them."""
    limit = _CONTEXT_LIMIT.search(body)
    inputs = _INPUT_TOKENS.search(body)
    if limit is None or inputs is None:
        return None
    return int(limit.group(1)) - int(inputs.group(1) or inputs.group(2))


@dataclass(frozen=True, slots=True)
class Piece:
    """What one chunk adds to the answer."""

    text: str
    logprobs: list[Any] | None  # the chunk's chat logprobs entries, when requested
    finish_reason: str | None  # the answer's, on the last chunk only
    stop_reason: Any = None  # ditto


class ChunkAnswerError(Exception):
    """A chunk's answer is not a chat completion the loop can continue from."""


@dataclass
class ChunkedDecode:
    """The state of one chunked decode: the next chunk's body, and the answer so far.

    ``base`` is the decode leg's body (the client's, plus what the P/D path added).
    """

    base: Mapping[str, Any]
    chunk_size: int
    budget: int | None = None
    generated: int = 0  # completion tokens over all chunks so far
    chunks: int = 0
    done: bool = False
    texts: list[str] = field(default_factory=list)
    logprobs: list[Any] | None = None
    first: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    cap: int | None = None  # max_tokens that fit the context, once the engine said so
    capped_chunk: int = -1  # the chunk sent capped
    events: int = 0  # SSE events made

    def __post_init__(self) -> None:
        self.budget = output_budget(self.base)

    @property
    def streaming(self) -> bool:
        return self.base.get("stream") is True

    @property
    def stream_options(self) -> Mapping[str, Any]:
        options = self.base.get("stream_options")
        return options if isinstance(options, Mapping) else {}

    def next_body(self) -> dict[str, Any] | None:
        """The next chunk's request body; None once the answer is complete."""
        if self.done:
            return None
        size = self.chunk_size
        if self.budget is not None:
            size = min(size, self.budget - self.generated)
        if self.cap is not None:
            size = min(size, self.cap)
        body = dict(self.base)
        body["max_tokens"] = size
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = size
        min_tokens = _count(body.get("min_tokens"))
        if min_tokens:
            body["min_tokens"] = min(size, max(0, min_tokens - self.generated))
        body["stream"] = False
        body.pop("stream_options", None)
        if self.chunks:
            for name in _KV_FIELDS:
                body.pop(name, None)
            xargs = body.get("vllm_xargs")
            if isinstance(xargs, Mapping) and "kv_transfer_params" in xargs:
                body["vllm_xargs"] = {k: v for k, v in xargs.items() if k != "kv_transfer_params"}
            body["messages"] = self._continued_messages()
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        return body

    def _continued_messages(self) -> list[Any]:
        messages = list(self.base.get("messages") or [])
        so_far = "".join(self.texts)
        last = messages[-1] if messages else None
        if (
            self.base.get("continue_final_message") is True
            and isinstance(last, Mapping)
            and last.get("role") == "assistant"
        ):
            # The client continues its own assistant message: so does every chunk.
            content = last.get("content")
            extended: Any
            if isinstance(content, list):
                extended = [*content, {"type": "text", "text": so_far}]
            else:
                extended = (content if isinstance(content, str) else "") + so_far
            messages[-1] = {**last, "content": extended}
        else:
            messages.append({"role": "assistant", "content": so_far})
        return messages

    def take(self, answer: object) -> Piece:
        """Record one chunk's (non-streamed) answer; :attr:`done` says if it was the last."""
        if not isinstance(answer, dict):
            raise ChunkAnswerError("not a JSON object")
        choices = answer.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            raise ChunkAnswerError("no choice")
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        text = content if isinstance(content, str) else ""
        usage = answer.get("usage")
        tokens = _count(usage.get("completion_tokens")) if isinstance(usage, dict) else None
        if tokens is None:
            raise ChunkAnswerError("no usage.completion_tokens")
        finish = choice.get("finish_reason")
        logprobs = choice.get("logprobs")
        entries = logprobs.get("content") if isinstance(logprobs, dict) else None
        entries = entries if isinstance(entries, list) else None
        if entries is not None:
            self.logprobs = [*(self.logprobs or []), *entries]
        if self.first is None:
            self.first = answer
        self.last = answer
        self.generated += tokens
        self.chunks += 1
        self.texts.append(text)
        self.done = (
            finish != "length"
            or (self.budget is not None and self.generated >= self.budget)
            or (tokens == 0 and not text)
            or self.cap is not None  # capped to the context: nothing more fits
        )
        if not self.done:
            return Piece(text, entries, None)
        return Piece(text, entries, finish if isinstance(finish, str) else None,
                     choice.get("stop_reason"))  # fmt: skip

    def refused(self, status: int, body: bytes) -> str | None:
        """A chunk's error answer at the context limit, for a request with no budget:
        ``"retry"`` (send the chunk again, capped to the room left) or ``"end"`` (the
        answer ends with the text so far); None for any other failure."""
        if self.budget is not None or not is_context_refusal(status, body):
            return None
        room = context_room(body)
        if room is not None and room >= 1 and self.capped_chunk != self.chunks:
            self.cap = room
            self.capped_chunk = self.chunks
            return "retry"
        return "end" if self.chunks else None

    def end_at_limit(self) -> Piece:
        """End the answer at the context limit, as unchunked vLLM does (``length``)."""
        self.done = True
        if self.last is not None:
            choice = dict(self.last["choices"][0])
            choice["finish_reason"] = "length"
            choice.pop("stop_reason", None)
            self.last = {**self.last, "choices": [choice]}
        return Piece("", None, "length")

    def usage(self) -> dict[str, Any]:
        """The answer's usage: the first chunk's prompt, every chunk's completion tokens."""
        first = self.first.get("usage") if self.first is not None else None
        first = first if isinstance(first, dict) else {}
        prompt = _count(first.get("prompt_tokens")) or 0
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "total_tokens": prompt + self.generated,
            "completion_tokens": self.generated,
        }
        if first.get("prompt_tokens_details") is not None:
            usage["prompt_tokens_details"] = first["prompt_tokens_details"]
        return usage

    def answer(self) -> dict[str, Any]:
        """The reassembled non-streamed answer (after the last chunk)."""
        assert self.first is not None
        assert self.last is not None
        out = dict(self.last)
        for key in ("id", "created"):
            if key in self.first:
                out[key] = self.first[key]
        choice = dict(self.last["choices"][0])
        message = choice.get("message")
        choice["message"] = {**(message if isinstance(message, dict) else {}),
                             "content": "".join(self.texts)}  # fmt: skip
        if self.logprobs is not None:
            choice["logprobs"] = {"content": self.logprobs}
        out["choices"] = [choice]
        out["usage"] = self.usage()
        return out

    def _event_head(self) -> dict[str, Any]:
        first = self.first or {}
        return {
            "id": first.get("id"),
            "object": "chat.completion.chunk",
            "created": first.get("created"),
            "model": first.get("model"),
        }

    def event(self, piece: Piece) -> bytes:
        """One SSE event carrying a chunk's text (the first one also the role)."""
        delta: dict[str, Any] = {"content": piece.text}
        if self.events == 0:
            delta = {"role": "assistant", **delta}
        self.events += 1
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "logprobs": None if piece.logprobs is None else {"content": piece.logprobs},
            "finish_reason": piece.finish_reason,
        }
        if piece.stop_reason is not None:
            choice["stop_reason"] = piece.stop_reason
        payload = {**self._event_head(), "choices": [choice]}
        if self.stream_options.get("continuous_usage_stats") is True:
            payload["usage"] = self.usage()
        return b"data: " + dumps(payload) + b"\n\n"

    def usage_event(self) -> bytes | None:
        """The closing usage event, when the client asked for one (``include_usage``)."""
        if self.stream_options.get("include_usage") is not True:
            return None
        payload = {**self._event_head(), "choices": [], "usage": self.usage()}
        return b"data: " + dumps(payload) + b"\n\n"


@dataclass(frozen=True, slots=True)
class ChunkAnswer:
    """One chunk's whole answer from the engine."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


SendChunk = Callable[[bytes], Awaitable[ChunkAnswer]]
AbortStream = Callable[[StreamResponse, Exchange], Awaitable[None]]


async def run_chunked(
    request: Request,
    ex: Exchange,
    shape: ApiShape,
    state: ChunkedDecode,
    send: SendChunk,
    *,
    cached: int | None = None,
    note: Mapping[str, str] | None = None,
    on_chunk: Callable[[], None] | None = None,
    on_abort: AbortStream | None = None,
) -> StreamResponse:
    """:func:`_run_chunked`, under llm-d's ``chunked_decode`` span when traced."""

    def run() -> Awaitable[StreamResponse]:
        return _run_chunked(
            request, ex, shape, state, send,
            cached=cached, note=note, on_chunk=on_chunk, on_abort=on_abort,
        )  # fmt: skip

    if not tracing.is_traced():
        return await run()
    try:
        return await tracing.chunked_decode(
            state.chunk_size, state.streaming, run, lambda: (state.chunks, state.generated)
        )
    finally:
        if state.chunks:
            tracing.note_final_usage({"usage": state.usage()})


async def _run_chunked(
    request: Request,
    ex: Exchange,
    shape: ApiShape,
    state: ChunkedDecode,
    send: SendChunk,
    *,
    cached: int | None = None,
    note: Mapping[str, str] | None = None,
    on_chunk: Callable[[], None] | None = None,
    on_abort: AbortStream | None = None,
) -> StreamResponse:
    """Send the chunks one after the other and answer the client: one JSON answer, or one
    SSE stream started after the first chunk succeeded.

    Before anything reached the client, a failure is raised and an engine's error answer
    is relayed as it came; after that, the stream ends with an error event, as any
    decode stream that breaks. When the client goes away the handler is cancelled: the
    chunk in flight is abandoned (``send`` closes its connection) and no other starts.
    ``cached`` replaces the cached-token count in the usage (the prefill's view).
    """
    headers: CIMultiDict[str] = CIMultiDict()
    headers[REQUEST_ID] = ex.reply_id
    if note:
        headers.update(note)
    out: StreamResponse | None = None
    try:
        while (body := state.next_body()) is not None:
            try:
                answer = await send(dumps(body))
                if on_chunk is not None:
                    on_chunk()
                verdict = None
                if not 200 <= answer.status < 300:
                    verdict = state.refused(answer.status, answer.body)
                    if verdict == "retry":
                        continue
                if verdict == "end":
                    piece = state.end_at_limit()
                elif not 200 <= answer.status < 300:
                    if out is None:
                        relayed = response_headers(answer.headers)
                        relayed.update(headers)
                        return Response(status=answer.status, headers=relayed,
                                        body=answer.body)  # fmt: skip
                    raise DecodeError(
                        f"decode chunk {state.chunks + 1} answered {answer.status}: "
                        + answer.body[:512].decode("utf-8", "replace")
                    )
                else:
                    try:
                        piece = state.take(loads(answer.body))
                    except (ValueError, ChunkAnswerError) as exc:
                        raise DecodeError(
                            f"decode chunk {state.chunks + 1} answer unusable: {exc}"
                        ) from None
            except SidecarError as failure:
                if out is None:
                    raise
                ex.error = failure.message
                ex.status = failure.status
                await out.write(error_event(failure, ex.reply_id))
                await out.write_eof()
                return out
            if state.streaming:
                if out is None:
                    headers["Content-Type"] = "text/event-stream"
                    headers["Cache-Control"] = "no-cache"
                    out = StreamResponse(status=200, headers=headers)
                    await out.prepare(request)
                    ex.first_byte()
                await out.write(state.event(piece))
    except asyncio.CancelledError:
        if out is None or on_abort is None:
            raise
        await on_abort(out, ex)  # re-raises unless a concurrent leg's failure ended it
        return out
    if out is not None:
        closing = state.usage_event()
        if closing is not None:
            closing = _with_cached(shape, closing, cached)
            await out.write(closing)
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out
    payload = state.answer()
    if cached is not None:
        shape.write_cached(payload, cached)
    headers["Content-Type"] = "application/json"
    ex.first_byte()
    return Response(status=200, headers=headers, body=dumps(payload))


def _with_cached(shape: ApiShape, event: bytes, cached: int | None) -> bytes:
    if cached is None:
        return event
    payload = loads(event[len(b"data: ") :])
    shape.write_cached(payload, cached)
    return b"data: " + dumps(payload) + b"\n\n"
