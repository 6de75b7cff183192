"""The EPP process, wired in one place.

settings -> metrics -> director (scheduling) -> ext_proc gRPC server (Envoy's stream)
                                             -> gRPC health server (liveness, readiness)
                                             -> Prometheus metrics over HTTP

``EppApp.start``/``stop`` own every lifetime; ``run`` adds the signal handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from epp.config import ConfigError
from epp.director import Director, DirectorSettings, build_director
from epp.extproc import EXTPROC_SERVICE, ExtProcConfig, ExtProcService
from epp.metrics import EppMetrics
from epp.tls import load_cert_dir, self_signed

if TYPE_CHECKING:
    from epp.settings import EppSettings
    from epp.tls import CertificatePair

__all__ = ["LIVENESS_SERVICES", "READINESS_SERVICES", "EppApp", "StartupError", "run"]

log = logging.getLogger("epp")

# Liveness: the process answers. Readiness: config loaded and endpoints known. The ext_proc
# service name reports readiness too, as gateways probe it by that name.
LIVENESS_SERVICES = ("", "liveness")
READINESS_SERVICES = ("readiness", EXTPROC_SERVICE)
_READINESS_POLL_S = 0.2
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Room above the largest body for the rest of an ext_proc message (BUFFERED mode sends
# the whole body in one message).
_MESSAGE_OVERHEAD = 1024 * 1024


class StartupError(Exception):
    """The EPP cannot start; ``exit_code`` 2 for bad configuration, 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class EppApp:
    """One EPP: call ``start`` then ``stop``; ports are known once started."""

    def __init__(self, settings: EppSettings, metrics: EppMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else EppMetrics()
        self.director: Director | None = None
        self.grpc_port = 0
        self.health_port = 0
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._readiness_task: asyncio.Task[None] | None = None
        self._metrics_runner: web.AppRunner | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        s = self.settings
        director_settings = DirectorSettings(
            config_text=s.config_text,
            config_file=s.config_file,
            pool_name=s.pool_name,
            pool_namespace=s.pool_namespace,
            refresh_metrics_interval_s=s.refresh_metrics_interval,
            metrics_staleness_threshold_s=s.metrics_staleness_threshold,
            max_scrapes_per_second=s.max_scrapes_per_second,
            kubeconfig=s.kubeconfig,
            engine_metrics=s.engine_metrics(),
        )
        try:
            self.director = await build_director(director_settings, self.metrics)
        except (ConfigError, OSError, ValueError) as err:
            raise StartupError(f"configuration: {err}", exit_code=2) from err
        credentials = await self._credentials()

        await self._start_health()
        await self._start_metrics()
        # Endpoints first: a gateway that connects as soon as the port opens (Envoy
        # reconnecting after a restart does) must not meet an EPP that knows none yet.
        await self.director.start()
        await self._start_extproc(self.director, credentials)
        self._readiness_task = asyncio.create_task(self._track_readiness(self.director))
        log.info(
            "epp serving: ext_proc on %d (%s), health on %d, metrics on %d",
            self.grpc_port,
            "tls" if credentials is not None else "plaintext",
            self.health_port,
            self.metrics_port,
        )

    async def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if not s.secure_serving:
            return None
        try:
            pair: CertificatePair = (
                await asyncio.to_thread(load_cert_dir, s.cert_path)
                if s.cert_path
                else await asyncio.to_thread(self_signed)
            )
        except (OSError, ValueError) as err:
            raise StartupError(str(err), exit_code=2) from err
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

    async def _start_health(self) -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for name in LIVENESS_SERVICES:
            await self._health.set(name, _SERVING)
        for name in READINESS_SERVICES:
            await self._health.set(name, _NOT_SERVING)
        self.health_port = self._bind(server, self.settings.grpc_health_port, "--grpc-health-port")
        self._health_server = server
        await server.start()

    async def _start_metrics(self) -> None:
        registry = self.metrics.registry

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._metrics_runner = runner
        site = web.TCPSite(runner, self.settings.bind_address, self.settings.metrics_port)
        try:
            await site.start()
        except OSError as err:
            raise StartupError(f"--metrics-port: cannot listen: {err}") from err
        self.metrics_port = int(runner.addresses[0][1])

    async def _start_extproc(
        self, director: Director, credentials: grpc.ServerCredentials | None
    ) -> None:
        s = self.settings
        limit = s.max_request_body_bytes + _MESSAGE_OVERHEAD
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
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
        ExtProcService(director, self.metrics, config).register(server)
        self.grpc_port = self._bind(server, s.grpc_port, "--grpc-port", credentials)
        self._grpc = server
        await server.start()

    async def _track_readiness(self, director: Director) -> None:
        # Readiness follows the director (endpoints come and go); Watch clients get updates.
        ready: bool | None = None
        while True:
            now = director.is_ready()
            if now != ready:
                ready = now
                status = _SERVING if now else _NOT_SERVING
                for name in READINESS_SERVICES:
                    await self._health.set(name, status)
                log.info("readiness: %s", "ready" if now else "not ready")
            await asyncio.sleep(_READINESS_POLL_S)

    async def stop(self) -> None:
        """Stop taking traffic, let in-flight streams finish (bounded), release all."""
        if self._readiness_task is not None:
            self._readiness_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readiness_task
            self._readiness_task = None
        for name in READINESS_SERVICES:
            await self._health.set(name, _NOT_SERVING)
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


async def run(settings: EppSettings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = EppApp(settings)
    await app.start()
    try:
        await stop.wait()
        log.info(
            "shutting down: draining in-flight requests (up to %.1fs)", settings.shutdown_grace
        )
    finally:
        await app.stop()
