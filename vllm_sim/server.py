"""The simulator's HTTP face: vLLM's routes plus the ``/sim/*`` control routes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError

from common.multimodal import MODALITY
from common.routing_headers import DATA_PARALLEL_RANK

from .config import SimConfig
from .dcgm import DCGM_PATH, dcgm_handler
from .engine import (
    EC_PULL_PATH,
    MOONCAKE_PULL_PATH,
    MORIIO_NOTIFY_PATH,
    MORIIO_WRITE_PATH,
    PULL_PATH,
    SGLANG_JOIN_PATH,
    EngineError,
    KvLoadFailed,
    Run,
    SimEngine,
)
from .faults import Fault, FaultKind
from .metrics import engine_registry
from .nixl import PullRejected, PullRequest
from .p2p import P2P_LOOKUP_PATH, P2P_TAKE_PATH
from .sglang import BootstrapTimeout
from .shapes import SHAPES, ApiShape
from .shapes.base import error_info
from .stats import RecordedRequest, SimStats
from .tokens import chat_prompt, mm_hash, source_of, tokenize

__all__ = ["ENGINE", "SimServer", "create_app"]

log = logging.getLogger("vllm_sim")

ENGINE = web.AppKey("engine", SimEngine)
_REGISTRY = web.AppKey("registry", CollectorRegistry)
_MAX_BODY = 64 * 1024 * 1024


def _error(message: str, status: int, request_id: str | None = None) -> web.Response:
    headers = {"x-request-id": request_id} if request_id else None
    return web.json_response({"error": error_info(message, status)}, status=status, headers=headers)


def _load_json(raw: bytes) -> Mapping[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EngineError(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise EngineError("The request body nests too deeply.") from None
    if not isinstance(body, dict):
        raise EngineError("The request body must be a JSON object.")
    return body


def _drop_connection(request: web.Request, *, graceful: bool = False) -> web.StreamResponse:
    """Drop the connection: a reset, or (graceful) a close once the bytes written so far
    are sent, so that the peer reads them all before the end. The answer returned can
    no longer be sent, which aiohttp notes quietly: the engine's log stays free of
    tracebacks for faults it was asked to inject."""
    transport = request.transport
    if transport is not None:
        if graceful:
            transport.close()
        else:
            transport.abort()
    return web.Response(status=499, text="injected fault: connection dropped")


class _Generation:
    """One generation request, from body to the last byte."""

    def __init__(self, request: web.Request, shape: ApiShape) -> None:
        self.request = request
        self.shape = shape
        self.engine = request.app[ENGINE]
        self.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        self.headers = {"x-request-id": self.request_id}
        self.aborted = False

    async def handle(self) -> web.StreamResponse:
        engine, request = self.engine, self.request
        try:
            body = _load_json(await request.read())
            params = self.shape.parse(body)
            params.dp_rank = _dp_rank(request)
        except EngineError as exc:
            engine.stats.errors += 1
            return _error(str(exc), 400, self.request_id)
        role = engine.role_of(params)
        engine.stats.record(
            RecordedRequest(request.method, request.path, _headers(request), body, role)
        )
        model = body.get("model")
        if model is not None and model != engine.config.served_model_name:
            engine.stats.errors += 1
            return _error(f"The model `{model}` does not exist.", 404, self.request_id)
        try:
            run = engine.admit(params, self.request_id)
        except EngineError as exc:
            engine.stats.errors += 1
            return _error(str(exc), 400, self.request_id)
        try:
            return await self._serve(run, engine.faults.take(request.path, role))
        except asyncio.CancelledError:
            self._count_abort()
            raise

    async def _serve(self, run: Run, fault: Fault | None) -> web.StreamResponse:
        if fault is not None:
            early = await self._apply_fault(fault, run)
            if early is not None:
                return early
        if run.params.stream:
            return await self._stream(run, fault)
        try:
            async with self.engine.running_slot(run):
                async for _ in run.tokens():
                    pass
        except KvLoadFailed as exc:
            self.engine.stats.errors += 1
            return _error(str(exc), 500, self.request_id)
        created = int(time.time())
        payload = self.shape.response(
            run, self.engine.config.served_model_name, self._response_id(), created
        )
        if fault is not None and fault.kind is FaultKind.TRUNCATE:
            return await self._truncated(json.dumps(payload).encode())
        return web.json_response(payload, headers=self.headers)

    async def _truncated(self, body: bytes) -> web.StreamResponse:
        """Promise the whole body, send half of it, drop the connection."""
        response = web.StreamResponse(headers={**self.headers, "Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(self.request)
        await response.write(body[: len(body) // 2])
        return _drop_connection(self.request, graceful=True)

    async def _apply_fault(self, fault: Fault, run: Run) -> web.StreamResponse | None:
        kind = fault.kind
        if kind is FaultKind.STATUS:
            return _error(f"injected fault: status {fault.status}", fault.status, self.request_id)
        if kind is FaultKind.DELAY:
            await asyncio.sleep(fault.delay_ms / 1000.0)
        elif kind is FaultKind.HANG:
            await asyncio.Event().wait()
        elif kind is FaultKind.MALFORMED_JSON:
            return web.Response(
                body=b'{"id": "broken", "choices": [',
                content_type="application/json",
                headers=self.headers,
            )
        elif kind is FaultKind.DISCONNECT and (fault.after_chunks == 0 or not run.params.stream):
            return _drop_connection(self.request)
        elif kind is FaultKind.OMIT_KV_TRANSFER_PARAMS:
            run.omit_kv_transfer_params = True
        return None

    async def _stream(self, run: Run, fault: Fault | None) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                **self.headers,
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(self.request)
        cutting = fault is not None and fault.kind in (FaultKind.DISCONNECT, FaultKind.TRUNCATE)
        cut_after = fault.after_chunks if fault is not None and cutting else None
        half_chunk = fault is not None and fault.kind is FaultKind.TRUNCATE
        renderer = self.shape.renderer(
            run, self.engine.config.served_model_name, self._response_id(), int(time.time())
        )
        sent = 0

        async def send(chunks: list[bytes]) -> None:
            nonlocal sent
            for chunk in chunks:
                if cut_after is not None and sent >= cut_after:
                    if half_chunk:
                        await response.write(chunk[: len(chunk) // 2])
                    _drop_connection(self.request, graceful=half_chunk)
                    raise _Cut
                await response.write(chunk)
                sent += 1

        try:
            async with self.engine.running_slot(run):
                await send(renderer.start())
                async for token_id, piece in run.tokens():
                    await send(renderer.token(token_id, piece))
            await send(renderer.end())
        except KvLoadFailed as exc:
            self.engine.stats.errors += 1
            await send(renderer.error(str(exc), 500))
        except _Cut:
            return response
        except ConnectionResetError:
            # The client left mid-stream: vLLM aborts the request. Returning (rather than
            # raising) lets aiohttp note the closed connection quietly.
            self._count_abort()
            return response
        await response.write_eof()
        return response

    def _response_id(self) -> str:
        return f"{self.shape.id_prefix}{self.request_id}"

    def _count_abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            self.engine.stats.aborts += 1


def _dp_rank(request: web.Request) -> int | None:
    """vLLM's ``X-data-parallel-rank`` header: pins the request to one rank."""
    value = request.headers.get(DATA_PARALLEL_RANK)
    if value is None:
        return None
    if not value.isdigit():
        raise EngineError(f"X-data-parallel-rank must be an integer, got {value!r}.")
    return int(value)


def _headers(request: web.Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


async def _generation(request: web.Request) -> web.StreamResponse:
    return await _Generation(request, SHAPES[request.path]).handle()


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _models(request: web.Request) -> web.Response:
    cfg = request.app[ENGINE].config
    model = {
        "id": cfg.served_model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "vllm",
        "root": cfg.served_model_name,
        "parent": None,
        "max_model_len": cfg.max_model_len,
    }
    return web.json_response({"object": "list", "data": [model]})


async def _metrics(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    fault = engine.faults.take(request.path, engine.config.role, named_only=True)
    if fault is not None:  # a scraper's stale-metrics cases
        answer = await _side_channel_fault(
            request, fault, garbage=b"vllm:num_requests_running{", content_type="text/plain"
        )
        if answer is not None:
            return answer
    registry = request.app[_REGISTRY]
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def _tokenize(request: web.Request) -> web.Response:
    """vLLM's ``POST /tokenize``: a completion prompt or chat messages -> token ids."""
    cfg = request.app[ENGINE].config
    try:
        body = _load_json(await request.read())
        model = body.get("model")
        if model is not None and model != cfg.served_model_name:
            return _error(f"The model `{model}` does not exist.", 404)
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise EngineError("'messages' must be a list of message objects.")
            text = chat_prompt(
                messages,
                add_generation_prompt=body.get("add_generation_prompt", True) is not False,
                continue_final_message=body.get("continue_final_message") is True,
            )
            tokens = tokenize(text)
        elif isinstance(body.get("prompt"), str):
            tokens = tokenize(body["prompt"])
        else:
            raise EngineError("Either 'prompt' (a string) or 'messages' is required.")
    except EngineError as exc:
        return _error(str(exc), 400)
    return web.json_response(
        {
            "count": len(tokens),
            "max_model_len": cfg.max_model_len,
            "tokens": tokens,
            "token_strs": None,
        }
    )


EMBEDDING_DIM = 8


def _embedding_inputs(value: Any) -> list[list[int]]:
    """vLLM's ``input`` forms -> token id lists: a string, strings, ids, or lists of ids."""
    if isinstance(value, str):
        return [tokenize(value)]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [tokenize(v) for v in value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [list(value)]
        if all(
            isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
            for v in value
        ):
            return [list(v) for v in value]
    raise EngineError("'input' must be a string, a list of strings, or token ids.")


def _embedding(ids: list[int]) -> list[float]:
    """A deterministic unit-free vector per token sequence (same input, same vector)."""
    digest = hashlib.sha256(json.dumps(ids).encode()).digest()
    return [round(b / 255.0 * 2.0 - 1.0, 6) for b in digest[:EMBEDDING_DIM]]


async def _embeddings(request: web.Request) -> web.Response:
    """vLLM's ``POST /v1/embeddings``, as lenient as vLLM about extra fields."""
    cfg = request.app[ENGINE].config
    try:
        body = _load_json(await request.read())
        model = body.get("model")
        if model is not None and model != cfg.served_model_name:
            return _error(f"The model `{model}` does not exist.", 404)
        if "input" not in body:
            raise EngineError("Field 'input' is required.")
        inputs = _embedding_inputs(body["input"])
    except EngineError as exc:
        return _error(str(exc), 400)
    tokens = sum(len(ids) for ids in inputs)
    return web.json_response(
        {
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": cfg.served_model_name,
            "data": [
                {"index": i, "object": "embedding", "embedding": _embedding(ids)}
                for i, ids in enumerate(inputs)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }
    )


_RENDER_MODALITY = MODALITY


def _render_features(messages: list[Mapping[str, Any]], tokens: list[int]) -> dict[str, Any] | None:
    """vLLM's render ``features``: each multimodal item's hash and token span (its
    placeholder token and identity token, in prompt order)."""
    sources = iter(
        src
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, Mapping) and (src := source_of(part)) is not None
    )
    markers = {tokenize(f"<|{kind}|>")[0]: kind for kind in _RENDER_MODALITY}
    hashes: dict[str, list[str]] = {}
    places: dict[str, list[dict[str, int]]] = {}
    for offset, token in enumerate(tokens):
        kind = markers.get(token)
        if kind is None:
            continue
        src = next(sources, None)
        if src is None:
            break
        modality = _RENDER_MODALITY[kind]
        hashes.setdefault(modality, []).append(mm_hash(src))
        places.setdefault(modality, []).append({"offset": offset, "length": 2})
    if not hashes:
        return None
    return {"mm_hashes": hashes, "mm_placeholders": places}


async def _render(request: web.Request) -> web.Response:
    """vLLM's ``POST /v1/chat/completions/render`` and ``/v1/completions/render``: the
    prompt as the engine would tokenize it, without generating (as ``vllm launch
    render`` serves them). Fields it does not use are ignored, as vLLM does."""
    cfg = request.app[ENGINE].config
    chat = request.path.startswith("/v1/chat/")
    try:
        body = _load_json(await request.read())
        model = body.get("model")
        if model is not None and model != cfg.served_model_name:
            return _error(f"The model `{model}` does not exist.", 404)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise EngineError("'messages' must be a list of message objects.")
            text = chat_prompt(
                messages,
                add_generation_prompt=body.get("add_generation_prompt", True) is not False,
                continue_final_message=body.get("continue_final_message") is True,
            )
            tokens = tokenize(text)
            return web.json_response(
                {
                    "model": cfg.served_model_name,
                    "token_ids": tokens,
                    "features": _render_features(messages, tokens),
                }
            )
        prompt = body.get("prompt")
        prompts: list[list[int]]
        if isinstance(prompt, str):
            prompts = [tokenize(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [tokenize(p) for p in prompt]
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            prompts = [list(prompt)]
        else:
            raise EngineError("'prompt' must be a string, a list of strings or token ids.")
    except EngineError as exc:
        return _error(str(exc), 400)
    return web.json_response(
        [{"model": cfg.served_model_name, "token_ids": ids, "features": None} for ids in prompts]
    )


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[ENGINE].stats_dict())


async def _reset(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    engine.stats = SimStats()
    if request.query.get("cache") in ("1", "true"):
        engine.cache.reset()
    return web.json_response({"ok": True})


async def _add_fault(request: web.Request) -> web.Response:
    try:
        fault = Fault.model_validate_json(await request.read())
    except ValidationError as exc:
        return _error(f"invalid fault: {exc}", 400)
    request.app[ENGINE].faults.add(fault)
    return web.json_response({"ok": True})


async def _clear_faults(request: web.Request) -> web.Response:
    request.app[ENGINE].faults.clear()
    return web.json_response({"ok": True})


async def _pull(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    fault = engine.faults.take(request.path, engine.config.role, named_only=True)
    if fault is not None:
        answer = await _side_channel_fault(
            request, fault, garbage=b'{"token_ids": [', content_type="application/json"
        )
        if answer is not None:
            return answer
    try:
        pull = PullRequest.model_validate_json(await request.read())
        token_ids = engine.serve_pull(pull)
    except ValidationError as exc:
        return _error(f"invalid pull request: {exc}", 400)
    except PullRejected as exc:
        return _error(f"pull rejected: {exc.reason}", 409)
    return web.json_response({"token_ids": token_ids})


async def _side_channel_fault(
    request: web.Request, fault: Fault, *, garbage: bytes, content_type: str
) -> web.StreamResponse | None:
    """Apply a fault to a side-channel request (a KV pull, a metrics scrape), answering
    ``garbage`` for ``malformed_json``; None: go on and serve it."""
    kind = fault.kind
    if kind is FaultKind.STATUS:
        return _error(f"injected fault: status {fault.status}", fault.status)
    if kind is FaultKind.MALFORMED_JSON:
        return web.Response(body=garbage, content_type=content_type)
    if kind is FaultKind.DISCONNECT:
        return _drop_connection(request)
    if kind is FaultKind.DELAY:
        await asyncio.sleep(fault.delay_ms / 1000.0)
    elif kind is FaultKind.HANG:
        await asyncio.Event().wait()  # ends when the client goes away
    return None


async def _ec_pull(request: web.Request) -> web.Response:
    body = await request.json()
    key = body.get("mm_hash") if isinstance(body, dict) else None
    size = request.app[ENGINE].serve_encoded(str(key))
    if size is None:
        return _error(f"no encoder output for {key}", 404)
    return web.json_response({"mm_hash": key, "size_bytes": size})


async def _moriio_body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("transfer_id"), str):
        return None
    return body


async def _moriio_notify(request: web.Request) -> web.Response:
    body = await _moriio_body(request)
    if body is None:
        return _error("expected a JSON object with transfer_id", 400)
    request.app[ENGINE].moriio_notify(body["transfer_id"])
    return web.json_response({})


async def _moriio_write(request: web.Request) -> web.Response:
    body = await _moriio_body(request)
    tokens = None if body is None else body.get("token_ids")
    if body is None or not isinstance(tokens, list):
        return _error("expected a JSON object with transfer_id and token_ids", 400)
    if not request.app[ENGINE].moriio_received(body["transfer_id"], tokens):
        return _error(f"no decode waits for transfer {body['transfer_id']}", 404)
    return web.json_response({})


# -- the bootstrap server (SGLang rendezvous, Mooncake query and pulls) ---------------------


async def _bootstrap_query(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    engine.stats.bootstrap_queries += 1
    ranks = engine.rank_engine_ids()
    return web.json_response({str(rank): {"engine_id": eid} for rank, eid in ranks.items()})


async def _bootstrap_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="a JSON object is required")
    return body


async def _sglang_join(request: web.Request) -> web.Response:
    body = await _bootstrap_json(request)
    room = body.get("room")
    if not isinstance(room, int):
        return _error("'room' must be an integer", 400)
    try:
        tokens = await request.app[ENGINE].sglang_join(room)
    except BootstrapTimeout as exc:
        request.app[ENGINE].stats.bootstrap_timeouts += 1
        return _error(str(exc), 504)
    return web.json_response({"token_ids": tokens})


async def _mooncake_pull(request: web.Request) -> web.Response:
    body = await _bootstrap_json(request)
    tokens = await request.app[ENGINE].mooncake_take(
        str(body.get("transfer_id")), body.get("engine_id")
    )
    if tokens is None:
        return _error("no such transfer (unknown, expired, taken, or wrong engine)", 404)
    return web.json_response({"token_ids": tokens})


def create_bootstrap_app(engine: SimEngine) -> web.Application:
    app = web.Application()
    app[ENGINE] = engine
    app.router.add_get("/query", _bootstrap_query)
    app.router.add_post(SGLANG_JOIN_PATH, _sglang_join)
    app.router.add_post(MOONCAKE_PULL_PATH, _mooncake_pull)
    return app


async def _p2p_take(request: web.Request) -> web.Response:
    body = await _bootstrap_json(request)
    tokens = await request.app[ENGINE].p2p_take(str(body.get("kv_request_id")))
    if tokens is None:
        return _error("no KV stored under this kv_request_id (unknown, expired or taken)", 404)
    return web.json_response({"token_ids": tokens})


async def _p2p_lookup(request: web.Request) -> web.Response:
    body = await _bootstrap_json(request)
    hashes = body.get("block_hashes")
    if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
        return _error("'block_hashes' must be a list of hex strings", 400)
    try:
        blocks = request.app[ENGINE].serve_lookup(hashes)
    except ValueError:
        return _error("'block_hashes' must be hex strings", 400)
    return web.json_response({"blocks": blocks})


def create_side_channel_app(engine: SimEngine) -> web.Application:
    """The KV / encoder-output side channel: its own port, as NIXL's is in vLLM."""
    app = web.Application()
    app[ENGINE] = engine
    app.router.add_post(PULL_PATH, _pull)
    app.router.add_post(EC_PULL_PATH, _ec_pull)
    app.router.add_post(MORIIO_NOTIFY_PATH, _moriio_notify)
    app.router.add_post(MORIIO_WRITE_PATH, _moriio_write)
    app.router.add_post(P2P_TAKE_PATH, _p2p_take)
    app.router.add_post(P2P_LOOKUP_PATH, _p2p_lookup)
    return app


def create_app(config: SimConfig) -> web.Application:
    app = web.Application(client_max_size=_MAX_BODY)
    engine = SimEngine(config)
    app[ENGINE] = engine
    app[_REGISTRY] = engine_registry(engine)
    for path in SHAPES:
        app.router.add_post(path, _generation)
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get(DCGM_PATH, dcgm_handler(engine))
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post("/v1/chat/completions/render", _render)
    app.router.add_post("/v1/completions/render", _render)
    app.router.add_get("/sim/stats", _stats)
    app.router.add_post("/sim/reset", _reset)
    app.router.add_post("/sim/faults", _add_fault)
    app.router.add_delete("/sim/faults", _clear_faults)

    async def engine_lifetime(app: web.Application) -> Any:
        for raw in config.faults:
            engine.faults.add(Fault.model_validate_json(raw))
        await engine.start()
        yield
        await engine.close()

    app.cleanup_ctx.append(engine_lifetime)
    return app


class _Cut(Exception):
    """A fault cut the connection in the middle of a stream."""


class SimServer:
    """A running simulated engine: ``async with SimServer(config) as sim: sim.url``."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.app = create_app(config)
        self.engine = self.app[ENGINE]
        # vLLM notices a client that went away by cancelling the request's handler.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        self._side_channel_runner = web.AppRunner(
            create_side_channel_app(self.engine), handler_cancellation=True, access_log=None
        )
        # Joins and pulls wait on a peer: a caller that leaves cancels its wait.
        self._bootstrap_runner = (
            web.AppRunner(
                create_bootstrap_app(self.engine), handler_cancellation=True, access_log=None
            )
            if config.bootstrap_port is not None
            else None
        )
        self.port = config.port
        self.bootstrap_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def host_port(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> SimServer:
        try:
            self.port = await _listen(self._runner, self.config.host, self.config.port)
            self.engine.port = self.port
            self.engine.side_channel_port = await _listen(
                self._side_channel_runner, self.config.host, self.config.nixl_side_channel_port
            )
            if self._bootstrap_runner is not None:
                assert self.config.bootstrap_port is not None
                self.bootstrap_port = await _listen(
                    self._bootstrap_runner, self.config.host, self.config.bootstrap_port
                )
                self.engine.bootstrap_port = self.bootstrap_port
        except BaseException:
            # The engine started with the runner (its client session, lease sweeper):
            # a port already taken must not leave them behind.
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        for runner in (self._bootstrap_runner, self._side_channel_runner, self._runner):
            if runner is not None:
                with contextlib.suppress(Exception):
                    await runner.cleanup()

    async def __aenter__(self) -> SimServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _listen(runner: web.AppRunner, host: str, port: int) -> int:
    """Start ``runner`` on host:port and return the bound port (port 0 picks one)."""
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else port
