"""The EPP process, wired in one place.

settings -> metrics, tracing -> director (scheduling) -> ext_proc gRPC server (Envoy)
                                                       -> gRPC health server
                                                       -> Prometheus metrics over HTTP
         -> Kubernetes API client -> leader election, /metrics authorisation

``EppApp.start``/``drain``/``stop`` own every lifetime; ``run`` adds the signals.

Health (grpc.health.v1 on ``--grpc-health-port``), as llm-d's probes ask for it:

- ``""`` and ``liveness``: SERVING while the process answers (also while draining, so a
  draining pod is not restarted).
- ``readiness`` and the ext_proc service name: the configuration is loaded, endpoints
  are known, this replica leads (with ``--ha-enable-leader-election``) and it is not
  draining.
- ``inference-extension`` (the name llm-d's chart probes with one replica, for liveness
  and readiness alike): as readiness, except that an empty pool is no reason to fail:
  discovery having listed the pool once is enough, so a pool scaled to zero does not
  get the EPP restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common import heap
from common.tls import CERT_FILE, KEY_FILE, load_cert_dir, self_signed
from epp.config import ConfigError
from epp.director import Director, DirectorSettings, build_director
from epp.extproc import EXTPROC_SERVICE, ExtProcConfig, ExtProcService
from epp.metrics import EppMetrics
from epp.request_telemetry import RequestTelemetry
from epp.settings import explicit_flags
from epp.stability import check_plugin_stability
from epp.tracing import Tracing

if TYPE_CHECKING:
    from common.tls import CertificatePair
    from epp.leader import LeaderElector
    from epp.settings import EppSettings

__all__ = [
    "INFERENCE_EXTENSION_SERVICE",
    "LIVENESS_SERVICES",
    "READINESS_SERVICES",
    "EppApp",
    "StartupError",
    "run",
]

log = logging.getLogger("epp")

LIVENESS_SERVICES = ("", "liveness")
READINESS_SERVICES = ("readiness", EXTPROC_SERVICE)
INFERENCE_EXTENSION_SERVICE = "inference-extension"
_READINESS_POLL_S = 0.2
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_CERT_POLL_S = 1.0


class StartupError(Exception):
    """The EPP cannot start; ``exit_code`` 2 for bad configuration, 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def director_settings(s: EppSettings, kube_api_server: str | None = None) -> DirectorSettings:
    """What the director takes from the flags."""
    return DirectorSettings(
        config_text=s.config_text,
        config_file=s.config_file,
        pool_name=s.pool_name,
        pool_namespace=s.namespace,
        pool_group=s.pool_group,
        endpoint_selector=s.endpoint_selector,
        endpoint_target_ports=s.endpoint_target_ports,
        disable_subset_filter=s.disable_endpoint_subset_filter,
        emit_endpoint_scores=s.emit_endpoint_scores,
        pool_metrics_interval_s=s.refresh_prometheus_metrics_interval,
        refresh_metrics_interval_s=s.refresh_metrics_interval,
        metrics_staleness_threshold_s=s.metrics_staleness_threshold,
        max_scrapes_per_second=s.max_scrapes_per_second,
        kubeconfig=s.kubeconfig,
        kube_api_server=kube_api_server,
        engine_metrics=s.engine_metrics(),
        api_objects_file=s.api_objects_file,
    )


@dataclass
class _Health:
    """What the health names are computed from."""

    leader: bool = True
    draining: bool = False


class _ReloadingCertificates:
    """``--enable-cert-reload``: gRPC asks before each handshake; new files are served."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._stamp = self._mtimes()
        self._last_check = 0.0
        self.reloads = 0

    def _mtimes(self) -> tuple[float, float]:
        d = Path(self.directory)
        return ((d / CERT_FILE).stat().st_mtime, (d / KEY_FILE).stat().st_mtime)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC's own threads: no event loop here.
        now = time.monotonic()
        if now - self._last_check < _CERT_POLL_S:
            return None
        self._last_check = now
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return None
            pair = load_cert_dir(self.directory)
        except (OSError, ValueError) as err:
            log.warning("--cert-path: keeping the current certificate: %s", err)
            return None
        self._stamp = stamp
        self.reloads += 1
        log.info("--cert-path: certificate reloaded from %s", self.directory)
        return grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.cert_pem)])


class EppApp:
    """One EPP: call ``start`` then ``stop``; ports are known once started."""

    def __init__(
        self,
        settings: EppSettings,
        metrics: EppMetrics | None = None,
        *,
        kube_api_server: str | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = (
            metrics
            if metrics is not None
            else EppMetrics(stream_metrics=settings.enable_grpc_stream_metrics)
        )
        self.kube_api_server = kube_api_server
        self.tracing = tracing
        self.director: Director | None = None
        self.elector: LeaderElector | None = None
        self.grpc_port = 0
        self.health_port = 0
        self.metrics_port = 0
        self.metrics_authorizer: Any = None
        self._api: Any = None
        self._grpc: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._state = _Health()
        self._readiness_task: asyncio.Task[None] | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.cert_reloader: _ReloadingCertificates | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        s = self.settings
        self._say_go_only_flags()
        if self.tracing is None:
            self.tracing = Tracing.from_environment() if s.tracing else Tracing()
        try:
            self.director = await build_director(
                director_settings(s, self.kube_api_server), self.metrics
            )
            config = self.director.config
            check_plugin_stability(
                ((p.instance_name, p.type) for p in config.document.plugins),
                s.allow_experimental_plugins,
            )
        except (ConfigError, OSError, ValueError) as err:
            raise StartupError(f"configuration: {err}", exit_code=2) from err
        credentials = await self._credentials()
        await self._start_kubernetes()

        await self._start_health()
        await self._start_metrics()
        # Endpoints first: a gateway that connects as soon as the port opens (Envoy
        # reconnecting after a restart does) must not meet an EPP that knows none yet.
        # Every replica keeps its datastore warm, leader or not.
        await self.director.start()
        await self._start_extproc(self.director, credentials)
        if self.elector is not None:
            self.elector.start()
        self._readiness_task = asyncio.create_task(self._track_readiness(self.director))
        log.info(
            "epp serving: ext_proc on %d (%s), health on %d, metrics on %d%s",
            self.grpc_port,
            "tls" if credentials is not None else "plaintext",
            self.health_port,
            self.metrics_port,
            ", leader election on" if self.elector is not None else "",
        )

    def _say_go_only_flags(self) -> None:
        given = explicit_flags(self.settings)
        if "enable-pprof" in given and self.settings.enable_pprof:
            log.info("--enable-pprof has no effect: the Go profiler does not exist here")
        if self.settings.tls_min_version in ("VersionTLS10", "VersionTLS11"):
            log.info(
                "--tls-min-version=%s: gRPC serves TLS 1.2 and 1.3 only; TLS 1.2 is the floor",
                self.settings.tls_min_version,
            )

    # -- Kubernetes: leader election and /metrics authorisation -------------------------

    async def _start_kubernetes(self) -> None:
        s = self.settings
        if not (s.ha_enable_leader_election or s.metrics_endpoint_auth):
            return
        from common.kube import api_client

        try:
            self._api = await api_client(self.kube_api_server, s.kubeconfig)
        except ConfigError as err:
            needs = [
                flag
                for flag, on in (
                    ("--ha-enable-leader-election", s.ha_enable_leader_election),
                    ("--metrics-endpoint-auth", s.metrics_endpoint_auth),
                )
                if on
            ]
            raise StartupError(
                f"{' and '.join(needs)} need the Kubernetes API ({err}); run in a cluster, "
                "pass --kubeconfig, or turn them off (--metrics-endpoint-auth=false)",
                exit_code=2,
            ) from err
        if s.metrics_endpoint_auth:
            from epp.metrics_auth import MetricsAuthorizer

            self.metrics_authorizer = MetricsAuthorizer(self._api)
        if s.ha_enable_leader_election:
            from epp.leader import LeaderElector, LeaseTiming, deployment_name, lease_name

            name = s.pool_name
            if not name:
                pod = os.environ.get("POD_NAME", "")
                try:
                    name = deployment_name(pod)
                except ValueError as err:
                    raise StartupError(
                        "--ha-enable-leader-election without --pool-name names its lease "
                        f"after the Deployment, read from POD_NAME: {err}",
                        exit_code=2,
                    ) from err
            self._state.leader = False
            self.elector = LeaderElector(
                self._api,
                namespace=s.namespace,
                name=lease_name(s.namespace, name),
                timing=LeaseTiming(
                    s.leader_lease_duration, s.leader_renew_deadline, s.leader_retry_period
                ),
                on_change=self._on_leadership,
            )

    def _on_leadership(self, leader: bool) -> None:
        self._state.leader = leader

    # -- TLS ------------------------------------------------------------------------------

    async def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if not s.secure_serving:
            return None
        if s.tls_min_version == "VersionTLS13":
            raise StartupError(
                "--tls-min-version=VersionTLS13: the gRPC server cannot refuse TLS 1.2 here; "
                "use VersionTLS12",
                exit_code=2,
            )
        try:
            pair: CertificatePair = (
                await asyncio.to_thread(load_cert_dir, s.cert_path)
                if s.cert_path
                else await asyncio.to_thread(self_signed)
            )
        except (OSError, ValueError) as err:
            raise StartupError(str(err), exit_code=2) from err
        if s.enable_cert_reload and s.cert_path:
            self.cert_reloader = _ReloadingCertificates(s.cert_path)
            initial = grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.cert_pem)])
            return grpc.dynamic_ssl_server_credentials(initial, self.cert_reloader)
        return grpc.ssl_server_credentials([(pair.key_pem, pair.cert_pem)])

    def _bind(
        self,
        server: grpc.aio.Server,
        port: int,
        what: str,
        credentials: grpc.ServerCredentials | None = None,
    ) -> int:
        address = _listen_address(self.settings.bind_address, port)
        try:
            if credentials is None:
                return int(server.add_insecure_port(address))
            return int(server.add_secure_port(address, credentials))
        except RuntimeError as err:
            raise StartupError(f"{what}: cannot listen on {address}: {err}") from err

    # -- servers --------------------------------------------------------------------------

    async def _start_health(self) -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for name in LIVENESS_SERVICES:
            await self._health.set(name, _SERVING)
        for name in (*READINESS_SERVICES, INFERENCE_EXTENSION_SERVICE):
            await self._health.set(name, _NOT_SERVING)
        self.health_port = self._bind(server, self.settings.grpc_health_port, "--grpc-health-port")
        self._health_server = server
        await server.start()

    def _metrics_ssl(self) -> ssl.SSLContext | None:
        s = self.settings
        if not s.metrics_cert_dir:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        d = Path(s.metrics_cert_dir)
        try:
            context.load_cert_chain(d / CERT_FILE, d / KEY_FILE)
            if s.metrics_client_ca_file:
                context.load_verify_locations(s.metrics_client_ca_file)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as err:
            raise StartupError(f"--metrics-cert-dir/--metrics-client-ca-file: {err}", 2) from err
        return context

    async def _start_metrics(self) -> None:
        registry = self.metrics.registry

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        middlewares = []
        if self.metrics_authorizer is not None:
            middlewares.append(self.metrics_authorizer.middleware)
        app = web.Application(middlewares=middlewares)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._metrics_runner = runner
        site = web.TCPSite(
            runner,
            self.settings.bind_address,
            self.settings.metrics_port,
            ssl_context=self._metrics_ssl(),
        )
        try:
            await site.start()
        except OSError as err:
            raise StartupError(f"--metrics-port: cannot listen: {err}") from err
        self.metrics_port = int(runner.addresses[0][1])

    async def _start_extproc(
        self, director: Director, credentials: grpc.ServerCredentials | None
    ) -> None:
        s = self.settings
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.recv_limit),
                ("grpc.max_send_message_length", s.send_limit),
                # The gateway pings to find out that we hang (epp/envoy_config.py); gRPC's
                # default answer to frequent pings is to drop the connection, streams and all.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 500),
                ("grpc.http2.max_ping_strikes", 0),
            ]
        )
        config = ExtProcConfig(
            max_body_bytes=s.max_request_body_bytes, decision_timeout_s=s.decision_timeout
        )
        telemetry = RequestTelemetry(self.metrics, self.tracing)
        ExtProcService(director, self.metrics, config, telemetry).register(server)
        if s.health_checking:
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.grpc_port = self._bind(server, s.grpc_port, "--grpc-port", credentials)
        self._grpc = server
        await server.start()

    # -- readiness ------------------------------------------------------------------------

    def health_statuses(self) -> dict[str, bool]:
        """Whether each readiness name is SERVING now."""
        director = self.director
        state = self._state
        gate = state.leader and not state.draining
        ready = director is not None and director.is_ready() and gate
        synced = director is not None and director.synced() and gate
        out = dict.fromkeys(READINESS_SERVICES, ready)
        out[INFERENCE_EXTENSION_SERVICE] = synced
        return out

    async def _track_readiness(self, director: Director) -> None:
        # Readiness follows the director (endpoints come and go), the lease and the drain;
        # Watch clients get updates.
        current: dict[str, bool] = {}
        while True:
            now = self.health_statuses()
            if now != current:
                for name, serving in now.items():
                    if current.get(name) != serving:
                        await self._health.set(name, _SERVING if serving else _NOT_SERVING)
                ready = now[READINESS_SERVICES[0]]
                if ready != current.get(READINESS_SERVICES[0]):
                    log.info(
                        "readiness: %s%s",
                        "ready" if ready else "not ready",
                        "" if self._state.leader else " (not the leader)",
                    )
                current = now
            await asyncio.sleep(_READINESS_POLL_S)

    # -- shutdown -------------------------------------------------------------------------

    async def drain(self) -> None:
        """SIGTERM: not ready at once, the lease released, ext_proc still serving."""
        self._state.draining = True
        for name in (*READINESS_SERVICES, INFERENCE_EXTENSION_SERVICE):
            await self._health.set(name, _NOT_SERVING)
        if self.elector is not None:
            await self.elector.stop(release=True)

    async def stop(self) -> None:
        """Stop taking traffic, let in-flight streams finish (bounded), release all."""
        self._state.draining = True
        if self._readiness_task is not None:
            self._readiness_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readiness_task
            self._readiness_task = None
        for name in (*READINESS_SERVICES, INFERENCE_EXTENSION_SERVICE):
            await self._health.set(name, _NOT_SERVING)
        if self.elector is not None:
            await self.elector.stop(release=True)
            self.elector = None
        if self.director is not None:
            # Requests waiting in flow control end now (503, rejected-shutting-down)
            # rather than with the stream when the grace period runs out.
            await self.director.requests.drain()
        if self._grpc is not None:
            await self._grpc.stop(grace=self.settings.shutdown_grace)
            self._grpc = None
        if self.director is not None:
            await self.director.stop()
        await self._health.enter_graceful_shutdown()
        if self._health_server is not None:
            await self._health_server.stop(grace=None)
            self._health_server = None
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self._api is not None:
            await self._api.close()
            self._api = None
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)


async def run(settings: EppSettings) -> None:
    """Serve until SIGTERM or SIGINT; then drain for ``--drain-timeout`` and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = EppApp(settings)
    await app.start()
    heap.settle()
    try:
        await stop.wait()
        log.info(
            "shutdown signal: not ready, draining for %.1fs while still serving "
            "(a second signal ends the drain)",
            settings.drain_timeout,
        )
        stop.clear()
        await app.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.drain_timeout)
        log.info("drain window over: in-flight requests get up to %.1fs", settings.shutdown_grace)
    finally:
        await app.stop()
