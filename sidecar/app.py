"""Wiring, in one visible place: settings -> sessions -> connector -> orchestrator -> servers.

Main port (served by :mod:`sidecar.server`; the routing table is :data:`_ROUTES`):
``GET /health`` (liveness), ``GET /ready`` (the local vLLM answers), the API paths of
``sidecar.api_shapes`` (P/D, E/PD or decode-only, as :mod:`sidecar.plan` decides), and
passthrough for everything else. Metrics port: ``GET /metrics``.

Two middlewares (:data:`_MIDDLEWARES`), one concern each: :func:`_record` owns the
request's :class:`~sidecar.exchange.Exchange` and emits its metrics and access log line;
inside it, :func:`_errors` is the one error boundary, turning :class:`SidecarError` into
JSON answers. With ``--tracing``, :func:`_trace` inside that serves each generation
request under its span.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Literal, TypedDict

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from common import heap
from common.json_codec import dumps
from sidecar import tracing
from sidecar.api_shapes import API_SHAPES, shape_for
from sidecar.connectors import Connector, ConnectorOptions, MoriioOptions, create_connector
from sidecar.connectors.moriio import MoriioConnector
from sidecar.data_parallel import local_hosts, parse_rank_target, rank_base_url
from sidecar.encode import EncodePolicy, EncoderStage
from sidecar.errors import InvalidRoutingHeader, PrefillRejected, SidecarError
from sidecar.exchange import Exchange, client_request_id, new_request_id
from sidecar.headers import REQUEST_ID, TRACEPARENT, TraceContext
from sidecar.health import Readiness
from sidecar.http1 import Http1Client
from sidecar.log import access_log, http_log, log
from sidecar.metrics import Metrics
from sidecar.orchestrator import Orchestrator, Policy
from sidecar.p2p import REMOTE_KV_SOURCE, P2PTier
from sidecar.passthrough import passthrough
from sidecar.plan import Route
from sidecar.ranks import Rank, Ranks
from sidecar.relay import StreamBroken
from sidecar.routing import (
    DATA_PARALLEL_HOST_PORT,
    ENCODER_HOSTS_PORTS,
    KV_CACHE_SOURCE_HOST_PORT,
    PREFILLER_HOST_PORT,
    HostPort,
    parse_host_ports,
)
from sidecar.server import (
    Handler,
    Request,
    RequestKey,
    Response,
    Server,
    StreamResponse,
    json_response,
)
from sidecar.settings import Settings
from sidecar.ssrf import AllowlistSource, MemberSource, PoolSource, TargetGuard
from sidecar.ssrf.rules import normalize_host
from sidecar.tls import ServingTLS, stage_contexts
from sidecar.tracing import SidecarTracing
from sidecar.upstream import Upstream, make_session
from sidecar.workers import WorkerError, Workers, merged_collector

__all__ = [
    "SERVER_KEEPALIVE_S",
    "Servers",
    "Services",
    "StartupError",
    "build_app",
    "build_metrics_app",
    "run",
    "run_worker",
    "start",
]

_CLIENT_CLOSED = 499  # nginx's convention: the client went away first
SERVER_KEEPALIVE_S = 75.0


class StartupError(Exception):
    """A file or service named by the settings is unusable; the message names the flag."""


@dataclass(slots=True)
class Services:
    orchestrator: Orchestrator
    local: Upstream
    readiness: Readiness
    guard: TargetGuard | None = None
    ranks: Ranks | None = None  # data-parallel ranks; rank 0 is the fields above


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
SERVICES = web.AppKey("services", Services)
EXCHANGE = RequestKey("exchange", Exchange)
TRACING = web.AppKey("tracing", SidecarTracing)


def _policy(settings: Settings) -> Policy:
    return Policy(
        max_body_bytes=settings.max_body_bytes,
        request_body_timeout=settings.request_body_timeout,
        prefill_max_retries=settings.prefill_max_retries,
        prefill_retry_backoff=settings.prefill_retry_backoff,
        prefiller_sampling=settings.enable_prefiller_sampling,
        prefill_fallback=settings.prefill_fallback,
        prefill_timeout=settings.prefill_timeout,
        decode_first_byte_timeout=settings.decode_first_byte_timeout,
        stream_idle_timeout=settings.stream_idle_timeout,
        allow_client_transfer_params=settings.allow_client_transfer_params,
        decode_chunk_size=settings.decode_chunk_size,
    )


def _target_guard(settings: Settings, metrics: Metrics) -> TargetGuard | None:
    if not settings.enable_ssrf_protection:
        return None
    source: MemberSource
    if settings.ssrf_allowlist_file:
        source = AllowlistSource(
            settings.ssrf_allowlist_file, interval_s=settings.ssrf_reload_interval
        )
    else:
        pool = settings.pool_ref
        if pool is None:  # Settings refuses this combination; kept for the type checker
            raise ValueError("--enable-ssrf-protection needs --inference-pool")
        source = PoolSource(
            namespace=pool[0],
            name=pool[1],
            pool_group=settings.pool_group,
            api_server=settings.kube_api_server or None,
            kubeconfig=settings.kubeconfig or None,
            sync_timeout_s=settings.kube_sync_timeout,
        )
    return TargetGuard(source, metrics)


async def _services(app: web.Application) -> AsyncIterator[None]:
    """Own the client sessions: one per stage, closed when the app shuts down."""
    settings = app[SETTINGS]
    metrics = app[METRICS]
    # First: an unusable allowlist stops start-up before any session exists.
    guard = _target_guard(settings, metrics)
    if guard is not None:
        await guard.start()

    # Everything opened from here on is closed on the way out, including when a later
    # step of start-up fails.
    async with contextlib.AsyncExitStack() as opened:
        if guard is not None:
            opened.push_async_callback(guard.stop)
        async for _ in _open_services(app, settings, metrics, guard, opened):
            yield


async def _open_services(
    app: web.Application,
    settings: Settings,
    metrics: Metrics,
    guard: TargetGuard | None,
    opened: contextlib.AsyncExitStack,
) -> AsyncIterator[None]:
    # Client TLS contexts by stage (prefill, decode, encode) for the --enable-tls stages.
    tls_contexts = await asyncio.to_thread(stage_contexts, settings)

    def count_stale(stage: str) -> None:
        metrics.stale_connection_retries.labels(stage=stage).inc()

    # One pool shape for every upstream (--max-idle-conns-per-host, llm-d's: 0 means
    # its default, 1024).
    pool: _PoolShape = {
        "limit": settings.pool_max_connections,
        "limit_per_host": settings.max_idle_conns_per_host or 1024,
        "keepalive_timeout": settings.pool_keepalive_timeout,
        "connect_timeout": settings.connect_timeout,
    }

    def session(
        decompress: bool, ssl_context: ssl.SSLContext | None = None
    ) -> aiohttp.ClientSession:
        created = make_session(**pool, decompress=decompress, ssl_context=ssl_context)
        opened.push_async_callback(created.close)
        return created

    def client(decompress: bool, ssl_context: ssl.SSLContext | None = None) -> Http1Client:
        created = Http1Client(**pool, decompress=decompress, ssl_context=ssl_context)
        opened.push_async_callback(created.close)
        return created

    def upstream(stage: str, decompress: bool) -> Upstream:
        """A stage's upstream: the lean HTTP/1.1 client its legs go through, and an
        aiohttp session for what connectors ask of it; TLS when the stage has a context."""
        ctx = tls_contexts.get(stage)
        return Upstream(
            stage,
            session(decompress, ctx),
            count_stale,
            tls=ctx is not None,
            client=client(decompress, ctx),
        )

    local = upstream("decode", decompress=False)
    readiness = Readiness(
        local.session,
        settings.model_server_url + "/health",
        ttl=settings.ready_cache_ttl,
        timeout=max(settings.connect_timeout, 1.0),
    )
    encode = upstream("encode", decompress=True) if settings.ec_connector else None
    orchestrator = Orchestrator(
        connector=_connector(settings, metrics),
        prefill=upstream("prefill", decompress=True),
        decode=local,
        policy=_policy(settings),
        metrics=metrics,
        encode=_encode_stage(settings, metrics, encode),
    )
    ranks = [Rank(0, settings.model_server_url, orchestrator, readiness)]
    for index in range(1, settings.data_parallel_size):
        base_url = settings.rank_model_server_url(index)
        rank_readiness = Readiness(
            local.session,
            base_url + "/health",
            ttl=settings.ready_cache_ttl,
            timeout=max(settings.connect_timeout, 1.0),
        )
        ranks.append(Rank(index, base_url, orchestrator, rank_readiness))
    app[SERVICES] = Services(
        orchestrator=orchestrator, local=local, readiness=readiness, guard=guard, ranks=Ranks(ranks)
    )
    for rank in ranks:
        opened.push_async_callback(rank.readiness.close)
    yield


class _PoolShape(TypedDict):
    """The connection-pool settings every upstream client shares."""

    limit: int
    limit_per_host: int
    keepalive_timeout: float
    connect_timeout: float


def _connector(settings: Settings, metrics: Metrics) -> Connector:
    options = ConnectorOptions(
        mooncake_bootstrap_port=settings.mooncake_bootstrap_port,
        sglang_bootstrap_port=settings.sglang_bootstrap_port,
        p2p=P2PTier(
            port=settings.p2p_connector_port,
            data_parallel_size=settings.data_parallel_size,
            base_port=settings.port,
        ),
        moriio=MoriioOptions(
            write_mode=settings.moriio_write_mode,
            parallel_dispatch=settings.moriio_parallel_dispatch,
            parallel_decode_wait_timeout=settings.moriio_parallel_decode_wait_timeout,
            local_pod_ip=settings.moriio_pod_ip,
            decode_notify_port=settings.moriio_decode_notify_port,
            decode_handshake_port=settings.moriio_decode_handshake_port,
            prefill_notify_port=settings.moriio_prefill_notify_port,
            prefill_handshake_port=settings.moriio_prefill_handshake_port,
            tp_size=settings.moriio_tp_size,
            dp_size=settings.moriio_dp_size,
            dp_size_local=settings.moriio_dp_size_local,
            remote_hosts=tuple(settings.moriio_remote_hosts),
            decode_hosts=tuple(settings.moriio_decode_hosts),
            dns_ttl=settings.moriio_dns_resolve_ttl,
            dns_timeout=settings.moriio_dns_resolve_timeout,
        ),
    )
    try:
        connector = create_connector(settings.effective_kv_connector, options)
    except ValueError as exc:
        raise StartupError(f"--kv-connector={settings.kv_connector}: {exc}") from exc
    if isinstance(connector, MoriioConnector):
        connector.peers.on_lookup = metrics.moriio_dns_reresolve.inc
        connector.peers.on_change = metrics.moriio_dns_ip_changed.inc
        connector.peers.on_failure = metrics.moriio_dns_lookup_failures.inc
    return connector


_EC_POLICIES: dict[str, Literal["ec-example", "ec-nixl", "ec-shared-storage"]] = {
    "ec-example": "ec-example",
    "ec-nixl": "ec-nixl",
    "ec-shared-storage": "ec-shared-storage",
}


def _encode_stage(
    settings: Settings, metrics: Metrics, encode: Upstream | None
) -> EncoderStage | None:
    connector = _EC_POLICIES.get(settings.ec_connector)
    if encode is None or connector is None:
        return None
    policy = EncodePolicy(
        connector=connector,
        timeout=settings.prefill_timeout,
        max_retries=settings.prefill_max_retries,
        retry_backoff=settings.prefill_retry_backoff,
    )
    return EncoderStage(encode, policy, metrics)


def _error_response(error: SidecarError, ex: Exchange) -> Response:
    if isinstance(error, PrefillRejected):
        headers = {REQUEST_ID: ex.reply_id}
        if error.content_type:
            headers["Content-Type"] = error.content_type
        return Response(status=error.status, body=error.body, headers=headers)
    return json_response(
        error.payload(ex.reply_id), status=error.status, headers={REQUEST_ID: ex.reply_id}
    )


async def _record(request: Request, handler: Handler) -> StreamResponse:
    """Outermost: the request's :class:`Exchange`, the in-flight gauge, and once it is
    answered, its metrics and access log line."""
    metrics = request.app[METRICS]
    ex = Exchange(
        request_id=new_request_id(),
        client_request_id=client_request_id(request.headers.get(REQUEST_ID)),
        method=request.method,
        path=request.path,
        trace=TraceContext.from_header(request.headers.get(TRACEPARENT)),
    )
    request[EXCHANGE] = ex
    metrics.in_flight.inc()
    try:
        response = await handler(request)
        if ex.status == 0:
            ex.status = response.status
        return response
    finally:
        metrics.in_flight.dec()
        ex.finish()
        if ex.mode != "health":
            _observe(metrics, ex)
            # Monitoring scrapes of vLLM's /metrics (the EPP polls every 50 ms) would
            # drown the request log: successful ones are logged at debug level.
            level = logging.DEBUG if _is_scrape(ex) else logging.INFO
            if access_log.isEnabledFor(level):
                access_log.log(level, ex.record())


async def _errors(request: Request, handler: Handler) -> StreamResponse:
    """The one error boundary: :class:`SidecarError` becomes its JSON answer, a client
    that left is noted, anything else is a 500 (after the first byte: re-raised)."""
    ex = request[EXCHANGE]
    try:
        return await handler(request)
    except SidecarError as error:
        ex.status = error.status
        ex.error = error.message
        if ex.response_started:
            raise
        log.warning({"event": "request_error", **ex.log_ids(), "error": ex.error})
        ex.first_byte()
        return _error_response(error, ex)
    except asyncio.CancelledError:
        ex.status = _CLIENT_CLOSED
        ex.error = ex.error or "client disconnected"
        raise
    except ConnectionResetError as exc:
        if not _client_gone(request):
            return _internal_error(exc, ex)
        # The client left while we wrote to it, before the server noticed and cancelled
        # the handler. An exception would be logged as a server error; an answer that
        # cannot be sent is noted quietly.
        ex.status = _CLIENT_CLOSED
        ex.error = ex.error or "client disconnected"
        return Response(status=_CLIENT_CLOSED)
    except StreamBroken:
        # A body that is not SSE broke after its first bytes went out: a dropped
        # connection is the one signal left that it is incomplete. Expected, so a
        # warning with the request id rather than a traceback.
        log.warning({"event": "response_cut", **ex.log_ids(), "error": ex.error})
        if request.transport is not None:
            request.transport.close()
        return Response(status=ex.status)  # never sent: the transport is closing
    except Exception as exc:
        return _internal_error(exc, ex)


async def _trace(request: Request, handler: Handler) -> StreamResponse:
    """``--tracing`` only: a generation request is served under its span."""
    return await request.app[TRACING].serve(request, request[EXCHANGE], handler)


# The middleware stack, outermost first.
_MIDDLEWARES = (_record, _errors)
_TRACED_MIDDLEWARES = (_record, _errors, _trace)


def _client_gone(request: Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _internal_error(exc: Exception, ex: Exchange) -> Response:
    """A bug: logged with its traceback, answered 500 (re-raised once bytes went out)."""
    ex.status = ex.status or 500
    ex.error = ex.error or repr(exc)
    if ex.response_started:
        raise exc
    log.exception({"event": "internal_error", **ex.log_ids()})
    ex.first_byte()
    return json_response(
        SidecarError("internal error").payload(ex.reply_id),
        status=500,
        headers={REQUEST_ID: ex.reply_id},
    )


def _is_scrape(ex: Exchange) -> bool:
    return ex.mode == "passthrough" and ex.path == "/metrics" and ex.status == 200


def _observe(metrics: Metrics, ex: Exchange) -> None:
    metrics.count_request(ex.path, ex.mode, ex.status)
    if ex.total_s is not None:
        metrics.total_seconds.observe(ex.total_s)
    if ex.ttft_s is not None:
        metrics.ttft_seconds.observe(ex.ttft_s)
    overhead = ex.overhead_s
    if overhead is not None and ex.mode in ("pd", "epd", "fallback"):
        metrics.overhead_seconds.observe(overhead)


def _rank(request: Request) -> Rank:
    services = request.app[SERVICES]
    if services.ranks is not None:
        return services.ranks.for_request(request)
    settings = request.app[SETTINGS]
    return Rank(0, settings.model_server_url, services.orchestrator, services.readiness)


async def _health(request: Request) -> StreamResponse:
    request[EXCHANGE].mode = "health"
    return json_response({"status": "alive"})


async def _ready(request: Request) -> StreamResponse:
    request[EXCHANGE].mode = "health"
    ready = await _rank(request).readiness.ready()
    return json_response(
        {"status": "ready" if ready else "not ready"}, status=200 if ready else 503
    )


async def _generate(request: Request) -> StreamResponse:
    """A generation API path (``sidecar.api_shapes``): P/D, E/PD or decode-only."""
    shape = shape_for(request.path)
    assert shape is not None  # routed here by its path
    services = request.app[SERVICES]
    ex = request[EXCHANGE]
    rank = _rank(request)
    if services.guard is not None:
        services.guard.check_headers(request.headers, ex.log_ids())
    kv_source = _kv_source(request, ex)
    orchestrator = rank.orchestrator
    prefill_header = request.headers.get(PREFILLER_HOST_PORT)
    try:
        route = orchestrator.plan(prefill_header, request.headers.get(ENCODER_HOSTS_PORTS))
    except InvalidRoutingHeader:
        ex.mode = "pd" if prefill_header is not None else "epd"
        raise
    if route.prefillers:
        tracing.note("llm_d.pd_proxy.prefill_candidates", len(route.prefillers))
    if route.encoders:
        tracing.note("llm_d.ec_proxy.encoder_candidates", len(route.encoders))
    decode_base_url = _decode_rank_url(request, rank)
    if route.route is not Route.LOCAL:
        return await orchestrator.serve(request, shape, route, ex, decode_base_url, kv_source)
    # Decode-only: the body goes to the engine as sent, once checked like any other.
    ex.mode = "local"
    read, body = await orchestrator.client_body(request, ex)
    if kv_source is not None and not _is_this_endpoint(request, kv_source):
        # The engine pulls the cached prefix from the peer; the sidecar owns the field.
        pull = orchestrator.connector.options.p2p.source_params(kv_source)
        body = {**body, "kv_transfer_params": {REMOTE_KV_SOURCE: pull}}
        read = dumps(body)
        if not orchestrator.chunks(shape, body):
            return await tracing.decode_only(
                request, ex, decode_base_url, body.get("stream") is True,
                lambda: _passthrough(request, read, decode_base_url, rewritten=True),
            )  # fmt: skip
    if orchestrator.chunks(shape, body):
        return await orchestrator.serve_local_chunked(
            request, shape, route, ex, decode_base_url, (read, body)
        )
    return await tracing.decode_only(
        request, ex, decode_base_url, body.get("stream") is True,
        lambda: _passthrough(request, read, decode_base_url),
    )  # fmt: skip


def _kv_source(request: Request, ex: Exchange) -> HostPort | None:
    """The peer of ``x-kv-cache-source-host-port`` to pull the cached prefix from.

    Ignored (never forwarded either) unless the engines have the P2P tier
    (offloading, or nixlv2 with --enable-p2p-pull). Otherwise the value must be one
    ``host:port`` (else 400) and, with --enable-ssrf-protection, a member of the pool
    (else 403, counted under stage ``kv-source``), like every other target."""
    value = request.headers.get(KV_CACHE_SOURCE_HOST_PORT)
    if value is None or not value.strip():
        return None
    settings = request.app[SETTINGS]
    if not settings.p2p_pull_available:
        log.debug(
            {
                "event": "kv_source_ignored",
                **ex.log_ids(),
                "reason": f"--kv-connector={settings.kv_connector} has no P2P tier",
            }
        )
        return None
    targets = parse_host_ports(value, KV_CACHE_SOURCE_HOST_PORT)
    if len(targets) != 1:
        raise InvalidRoutingHeader(KV_CACHE_SOURCE_HOST_PORT, value, "expected one host:port")
    guard = request.app[SERVICES].guard
    if guard is not None:
        guard.check(targets, "kv-source", ex.log_ids())
    tracing.note("llm_d.pd_proxy.kv_cache_source", targets[0].authority)
    return targets[0]


def _is_this_endpoint(request: Request, target: HostPort) -> bool:
    """Whether ``target`` is the endpoint this request arrived on (its own engine)."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not sockname or target.port != sockname[1]:
        return False
    settings = request.app[SETTINGS]
    hosts = local_hosts(settings.pod_ip, settings.listen_host, "127.0.0.1", "localhost", "::1")
    return normalize_host(target.host) in hosts


def _decode_rank_url(request: Request, rank: Rank) -> str:
    """The engine of the decode leg: the rank ``x-data-parallel-host-port`` names, else
    the rank of the port the request arrived on (see :mod:`sidecar.data_parallel`)."""
    value = request.headers.get(DATA_PARALLEL_HOST_PORT)
    if value is None:
        return rank.base_url
    target = parse_rank_target(value)
    services = request.app[SERVICES]
    settings = request.app[SETTINGS]
    urls = services.ranks.engine_urls() if services.ranks is not None else {}
    hosts = local_hosts(settings.pod_ip, settings.listen_host)
    return rank_base_url(target, urls, hosts)


async def _passthrough(
    request: Request,
    read: bytes | None = None,
    base_url: str | None = None,
    *,
    rewritten: bool = False,
) -> StreamResponse:
    """Everything else: to the local engine untouched."""
    settings = request.app[SETTINGS]
    return await passthrough(
        request,
        request.app[SERVICES].local,
        base_url if base_url is not None else _rank(request).base_url,
        request[EXCHANGE],
        first_byte_timeout=settings.decode_first_byte_timeout,
        idle_timeout=settings.stream_idle_timeout,
        read=read,
        rewritten=rewritten,
    )


# The routing table: health, the generation APIs; everything else is passthrough.
_ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/health"): _health,
    ("GET", "/ready"): _ready,
    **{("POST", path): _generate for path in API_SHAPES},
}


def _route(request: Request) -> Awaitable[StreamResponse]:
    return _ROUTES.get((request.method, request.path), _passthrough)(request)


def build_handler(settings: Settings) -> Handler:
    """The routing table inside the middlewares (outermost first)."""
    handler: Handler = _route
    middlewares = _TRACED_MIDDLEWARES if settings.tracing else _MIDDLEWARES
    for middleware in reversed(middlewares):
        handler = functools.partial(middleware, handler=handler)
    return handler


def build_app(settings: Settings, metrics: Metrics) -> web.Application:
    """The state handlers read (``request.app``) and the services' start and stop."""
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = metrics
    if settings.tracing:
        app[TRACING] = SidecarTracing.from_environment(
            kv_connector=settings.kv_connector,
            ec_connector=settings.ec_connector,
            parallel_dispatch=settings.moriio_write_mode and settings.moriio_parallel_dispatch,
        )
        app.on_cleanup.append(_stop_tracing)
    app.cleanup_ctx.append(_services)
    return app


async def _stop_tracing(app: web.Application) -> None:
    await asyncio.to_thread(app[TRACING].shutdown)  # flushes the spans still batched


WORKERS = web.AppKey("workers", Workers)


def build_metrics_app(metrics: Metrics) -> web.Application:
    async def serve_metrics(request: web.Request) -> web.Response:
        own = generate_latest(metrics.registry)
        workers = request.app.get(WORKERS)
        if workers is not None:
            # --workers: one endpoint answers for every process.
            async with aiohttp.ClientSession() as session:
                texts = await workers.scrape(session)
            registry = CollectorRegistry(auto_describe=False)
            registry.register(merged_collector([own.decode(), *texts]))
            own = generate_latest(registry)
        response = web.Response(body=own)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    return app


@dataclass(slots=True)
class Servers:
    """The running main and metrics servers of one sidecar."""

    app: web.Application
    metrics: Metrics
    server: Server
    metrics_runner: web.AppRunner
    port: int = 0  # as bound (settings may say 0: any free port); rank 0's
    metrics_port: int = 0
    ports: tuple[int, ...] = ()  # every rank's port, as bound
    tls: ServingTLS | None = None  # --secure-proxy
    workers: Workers | None = None  # --workers: the other processes on the same ports

    async def drain_and_stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the drain timeout), close."""
        services = self.app.get(SERVICES)
        if services is not None:
            services.readiness.draining = True
            for rank in services.ranks.all if services.ranks is not None else ():
                rank.readiness.draining = True
        stopping = (
            asyncio.ensure_future(self.workers.stop(self.app[SETTINGS].drain_timeout + 5.0))
            if self.workers is not None
            else None
        )
        await self.server.shutdown(self.app[SETTINGS].drain_timeout)
        await self.app.cleanup()  # the services: client sessions, watchers, tracing
        if stopping is not None:
            await stopping
        await self.metrics_runner.cleanup()
        if self.tls is not None:
            await self.tls.stop()


async def start(
    settings: Settings,
    metrics: Metrics | None = None,
    *,
    worker_ports: Sequence[int] | None = None,
) -> Servers:
    """Bind and serve. ``worker_ports``: this is an extra ``--workers`` process joining
    the ports the first one bound (its metrics go to an ephemeral loopback port)."""
    metrics = metrics if metrics is not None else Metrics()
    reuse_port = settings.workers > 1 or None
    app = build_app(settings, metrics)
    app.on_startup.freeze()
    await app.startup()  # the services (see _services)
    app.freeze()
    # Bounds an idle connection, and a client trickling its request headers, to 75 s;
    # Envoy lets go of idle ones sooner (60 s). Request bodies stay as the client encoded
    # them: passthrough forwards them with their Content-Encoding, and a P/D body that
    # is not plain JSON is a 400.
    handler = build_handler(settings)
    server = Server(handler, app, keepalive_timeout=SERVER_KEEPALIVE_S, log=http_log)
    metrics_runner = web.AppRunner(build_metrics_app(metrics), access_log=None)
    await metrics_runner.setup()
    servers = Servers(app, metrics, server, metrics_runner)
    try:
        if settings.secure_proxy:
            servers.tls = await ServingTLS.create(
                cert_path=settings.cert_path,
                pod_ip=settings.pod_ip,
                interval_s=settings.cert_reload_interval,
                on_reload=lambda outcome: metrics.tls_reloads.labels(outcome=outcome).inc(),
            )
        ssl_context = servers.tls.context if servers.tls is not None else None
        ranks = app[SERVICES].ranks
        ports: list[int] = []
        for index in range(settings.data_parallel_size):
            # Rank r on --port + r (any free port each when --port is 0).
            if worker_ports is not None:
                port = worker_ports[index]
            else:
                port = settings.port + index if settings.port else 0
            bound = await server.listen(
                settings.listen_host, port, ssl=ssl_context, reuse_port=reuse_port
            )
            ports.append(bound)
            if ranks is not None:
                ranks.bind(index, bound)
        if worker_ports is None:
            metrics_site = web.TCPSite(metrics_runner, settings.listen_host, settings.metrics_port)
        else:
            metrics_site = web.TCPSite(metrics_runner, "127.0.0.1", 0)
        await metrics_site.start()
        servers.port = ports[0]
        servers.ports = tuple(ports)
        servers.metrics_port = int(metrics_runner.addresses[0][1])
    except BaseException:
        await servers.drain_and_stop()
        raise
    return servers


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain in-flight requests and return."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        try:
            servers = await start(settings)
        except ValueError as exc:
            # Unusable start-up material (certificates, allowlist, Kubernetes config).
            raise StartupError(str(exc)) from exc
        heap.settle()
        if settings.workers > 1:
            try:
                servers.workers = await Workers.spawn(settings, servers.ports)
            except WorkerError as exc:
                await servers.drain_and_stop()
                raise StartupError(f"--workers: {exc}") from exc
            servers.metrics_runner.app[WORKERS] = servers.workers
        log.info(
            {
                "event": "listening",
                "workers": settings.workers,
                "worker_metrics_ports": servers.workers.metrics_ports if servers.workers else [],
                "port": servers.port,
                "data_parallel_ports": list(servers.ports),
                "tls": servers.tls is not None,
                "metrics_port": servers.metrics_port,
                "model_server": settings.model_server_url,
                "kv_connector": settings.kv_connector,
            }
        )
        await stop.wait()
        log.info({"event": "draining", "timeout_s": settings.drain_timeout})
        await servers.drain_and_stop()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info({"event": "stopped"})


async def run_worker(
    settings: Settings, ports: Sequence[int], index: int, report: Connection
) -> None:
    """One extra ``--workers`` process: serve ``ports`` until SIGTERM, then drain."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    servers = await start(settings, worker_ports=ports)
    heap.settle()
    report.send(servers.metrics_port)
    report.close()
    log.info({"event": "worker_listening", "worker": index, "ports": list(servers.ports)})
    await stop.wait()
    await servers.drain_and_stop()
