"""Bring up P/D on loopback: engines -> sidecars -> EPP (file discovery) -> Envoy.

Each KV connector needs its engines started to match (see :func:`engine_flags`):
``sglang`` puts the engines in SGLang disaggregation mode with a bootstrap server on the
prefill engine, ``mooncake`` gives the prefill engine a bootstrap server, and
``shared-storage`` points every engine at one storage directory. The sidecars learn
the bootstrap port from a flag, and one flag cannot name several ports on one host, so
``sglang`` and ``mooncake`` run with a single prefill engine here (in a cluster every
prefill pod has its own address and they all use the same port). Encode engines
(``encode``, E/P/D) come with ``--ec-connector`` on encoders, prefillers and sidecars.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.envoy_config import gateway_config

from .processes import EnvoyProcess, ManagedProcess, free_port, wait_until

__all__ = [
    "KV_CONNECTORS",
    "SAMPLE_PROMPT",
    "LocalStack",
    "StackOptions",
    "default_epp_config",
    "engine_flags",
]

ROLE_LABEL = "llm-d.ai/role"
# Which engine's metric names the EPP reads a pod's /metrics with (epp.engine_metrics).
ENGINE_LABEL = "llm-d.ai/engine-type"
SAMPLE_PROMPT = (
    "Explain prefill/decode disaggregation: why does running the prompt on one engine "
    "and the generation on another help latency under load?"
)
_READY_DEADLINE_S = 60.0
_STOP_DEADLINE_S = 30.0
KV_CONNECTORS = ("nixlv2", "shared-storage", "sglang", "mooncake")
_BOOTSTRAP_CONNECTORS = frozenset({"sglang", "mooncake"})


@dataclass
class StackOptions:
    prefill: int = 1
    decode: int = 1
    model: str = "sim-model"
    kv_connector: str = "nixlv2"
    encode: int = 0  # simulated encode engines (E/P/D)
    ec_connector: str = "ec-nixl"  # used when encode > 0
    gateway_port: int = 8080
    # Real engines instead of simulators: prefill as host:port, decode as a local port
    # (a sidecar always forwards to 127.0.0.1:<model-server-port>).
    prefill_engines: list[str] = field(default_factory=list)
    decode_engine_ports: list[int] = field(default_factory=list)
    zero_latency: bool = False
    non_cached_tokens: int = 16
    epp_config: Path | None = None
    sidecar_args: list[str] = field(default_factory=list)
    sim_args: list[str] = field(default_factory=list)
    epp_args: list[str] = field(default_factory=list)
    workdir: Path | None = None
    # How often the EPP checks the endpoints file for changes (file-discovery).
    discovery_watch_interval_s: float = 1.0
    # Envoy's HTTP/2 pings on its connection to the EPP (see epp.envoy_config).
    epp_ping_interval_s: float = 10.0
    epp_ping_timeout_s: float = 20.0
    # Flow control on, with example InferenceObjectives and an InferenceModelRewrite.
    flow_control: bool = False


def engine_flags(
    options: StackOptions, role: str, *, bootstrap_port: int, storage: Path
) -> list[str]:
    """The simulator flags an engine of ``role`` needs for the stack's connectors."""
    flags: list[str] = []
    connector = options.kv_connector
    if connector == "sglang" and role in ("prefill", "decode"):
        flags += ["--disaggregation-mode", role]
    if connector in _BOOTSTRAP_CONNECTORS and role == "prefill":
        flags += ["--bootstrap-port", str(bootstrap_port)]
    encoding = options.encode > 0
    if connector == "shared-storage" or (encoding and options.ec_connector == "ec-example"):
        flags += ["--shared-storage-path", str(storage)]
    # Encoder outputs are checked where the prompt is computed: the prefill engines, or
    # the decode engines when there are none (a decode that pulls KV needs no outputs).
    no_prefill = options.prefill == 0 and not options.prefill_engines
    if encoding and (role in ("encode", "prefill") or (role == "decode" and no_prefill)):
        flags += ["--ec-connector", options.ec_connector]
    return flags


def default_epp_config(
    endpoints_file: Path,
    non_cached_tokens: int,
    encode: bool = False,
    watch_interval_s: float = 1.0,
) -> str:
    """The P/D (or E/P/D) EndpointPickerConfig of the local stack (llm-d vocabulary)."""
    discovery: dict[str, Any] = {"path": str(endpoints_file), "watchFile": True}
    if watch_interval_s != 1.0:
        discovery["watchIntervalSeconds"] = watch_interval_s
    config: dict[str, Any] = {
        "apiVersion": "llm-d.ai/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [
            {"type": "file-discovery", "parameters": discovery},
            {"type": "decode-filter"},
            {"type": "prefill-filter"},
            {"type": "prefix-cache-scorer"},
            {"type": "queue-scorer"},
            {"type": "kv-cache-utilization-scorer"},
            {"type": "max-score-picker"},
            {
                "type": "prefix-based-pd-decider",
                "parameters": {"nonCachedTokens": non_cached_tokens},
            },
            {
                "type": "disagg-profile-handler",
                "parameters": {"deciders": {"prefill": "prefix-based-pd-decider"}},
            },
        ],
        "schedulingProfiles": [
            {
                "name": "decode",
                "plugins": [
                    {"pluginRef": "decode-filter"},
                    {"pluginRef": "prefix-cache-scorer", "weight": 2},
                    {"pluginRef": "queue-scorer"},
                    {"pluginRef": "kv-cache-utilization-scorer"},
                ],
            },
            {
                "name": "prefill",
                "plugins": [{"pluginRef": "prefill-filter"}, {"pluginRef": "queue-scorer"}],
            },
        ],
    }
    if encode:
        plugins = config["plugins"]
        plugins.insert(3, {"type": "encode-filter"})
        plugins.insert(-1, {"type": "always-disagg-multimodal-decider"})
        plugins[-1]["parameters"]["deciders"]["encode"] = "always-disagg-multimodal-decider"
        config["schedulingProfiles"].append(
            {
                "name": "encode",
                "plugins": [{"pluginRef": "encode-filter"}, {"pluginRef": "queue-scorer"}],
            }
        )
    return yaml.safe_dump(config, sort_keys=False)


@dataclass
class _Endpoint:
    name: str
    port: int
    role: str


class LocalStack:
    """Start with ``await stack.start()``; ``await stack.stop()`` ends every process."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.workdir = options.workdir or Path(tempfile.mkdtemp(prefix="disagg-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.processes: list[ManagedProcess] = []
        self.endpoints: list[_Endpoint] = []
        self.prefill_targets: list[str] = []
        self.envoy: EnvoyProcess | None = None
        self.epp_metrics_port = 0
        self.epp_health_port = 0
        self.epp_grpc_port = 0  # ext_proc
        self.epp: ManagedProcess | None = None
        self._decode_ports: list[int] = []
        self._encode_ports: list[int] = []
        self.bootstrap_port = 0  # the prefill engine's (sglang, mooncake)
        self.storage = self.workdir / "shared-storage"

    @property
    def decode_engine_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self._decode_ports]

    @property
    def prefill_engine_urls(self) -> list[str]:
        return [f"http://{target}" for target in self.prefill_targets]

    @property
    def encode_engine_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self._encode_ports]

    @property
    def gateway_url(self) -> str:
        assert self.envoy is not None, "stack not started"
        return f"http://127.0.0.1:{self.envoy.port}"

    def _check_options(self) -> None:
        opts = self.options
        if opts.kv_connector not in KV_CONNECTORS:
            raise ValueError(
                f"unknown KV connector {opts.kv_connector!r} (known: {', '.join(KV_CONNECTORS)})"
            )
        prefills = len(opts.prefill_engines) or opts.prefill
        if opts.kv_connector in _BOOTSTRAP_CONNECTORS and prefills > 1:
            raise ValueError(
                f"the {opts.kv_connector} connector reaches every prefill engine on one "
                "bootstrap port: on one host the local stack runs it with one prefill engine"
            )
        if opts.encode < 0:
            raise ValueError("encode engines must be >= 0")

    async def start(self) -> None:
        self._check_options()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                await self._start_engines(session)
                await self._start_sidecars(session)
                epp_port = await self._start_epp()
                await self._start_envoy(session, epp_port)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for proc in reversed(self.processes):
            await proc.stop()

    # -- stages ------------------------------------------------------------------
    def _python(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    async def _spawn(self, proc: ManagedProcess) -> ManagedProcess:
        self.processes.append(proc)
        await proc.start()
        return proc

    async def _start_engines(self, session: aiohttp.ClientSession) -> None:
        opts = self.options
        self.prefill_targets = list(opts.prefill_engines)
        self._decode_ports = list(opts.decode_engine_ports)
        starting: list[tuple[ManagedProcess, int]] = []
        wanted = [("prefill", opts.prefill if not opts.prefill_engines else 0)]
        wanted.append(("decode", opts.decode if not opts.decode_engine_ports else 0))
        wanted.append(("encode", opts.encode))
        if opts.kv_connector in _BOOTSTRAP_CONNECTORS:
            self.bootstrap_port = free_port()
        self.storage.mkdir(exist_ok=True)
        for role, count in wanted:
            for i in range(count):
                port = free_port()
                # Usage with cached-token counts, as production engines are run.
                args = ["--port", str(port), "--model", opts.model, "--role", role,
                        "--enable-prompt-tokens-details"]  # fmt: skip
                if opts.zero_latency:
                    args.append("--zero-latency")
                args += engine_flags(
                    opts, role, bootstrap_port=self.bootstrap_port, storage=self.storage
                )
                proc = ManagedProcess(
                    f"{role}-engine-{i}",
                    self._python("vllm_sim", *args, *opts.sim_args),
                    self.workdir,
                )
                starting.append((await self._spawn(proc), port))
                if role == "prefill":
                    self.prefill_targets.append(f"127.0.0.1:{port}")
                elif role == "encode":
                    self._encode_ports.append(port)
                else:
                    self._decode_ports.append(port)
        for proc, port in starting:
            await wait_until(
                _http_ok(session, f"http://127.0.0.1:{port}/health"),
                proc.name,
                _READY_DEADLINE_S,
                proc.check_alive,
            )
        for i, target in enumerate(self.prefill_targets):
            host, _, port_text = target.rpartition(":")
            self.endpoints.append(_Endpoint(f"prefill-{i}", int(port_text), "prefill"))
            if host not in ("127.0.0.1", "localhost"):
                raise ValueError(f"prefill engine {target}: the local stack runs on loopback only")
        for i, port in enumerate(self._encode_ports):
            self.endpoints.append(_Endpoint(f"encode-{i}", port, "encode"))

    def _sidecar_flags(self) -> list[str]:
        opts = self.options
        flags = [f"--kv-connector={opts.kv_connector}"]
        if opts.kv_connector == "sglang" and self.bootstrap_port:
            flags.append(f"--sglang-bootstrap-port={self.bootstrap_port}")
        if opts.kv_connector == "mooncake" and self.bootstrap_port:
            flags.append(f"--mooncake-bootstrap-port={self.bootstrap_port}")
        if opts.encode > 0:
            flags.append(f"--ec-connector={opts.ec_connector}")
        return flags

    async def _start_sidecars(self, session: aiohttp.ClientSession) -> None:
        starting = []
        for i, engine_port in enumerate(self._decode_ports):
            port, metrics_port = free_port(), free_port()
            args = [
                f"--port={port}",
                f"--model-server-port={engine_port}",
                f"--metrics-port={metrics_port}",
                "--listen-host=127.0.0.1",
                "--secure-proxy=false",  # plain HTTP on loopback (llm-d's default is HTTPS)
                "--prefill-max-retries=3",  # along the prefiller list (llm-d's default: 0)
                "--prefill-retry-backoff=100ms",
                *self._sidecar_flags(),
                *self.options.sidecar_args,
            ]
            proc = ManagedProcess(f"sidecar-{i}", self._python("sidecar", *args), self.workdir)
            starting.append((await self._spawn(proc), port))
            self.endpoints.append(_Endpoint(f"decode-{i}", port, "decode"))
        for proc, port in starting:
            await wait_until(
                _http_ok(session, f"http://127.0.0.1:{port}/ready"),
                proc.name,
                _READY_DEADLINE_S,
                proc.check_alive,
            )

    @property
    def endpoints_file(self) -> Path:
        return self.workdir / "endpoints.yaml"

    def write_endpoints(self, names: list[str] | None = None) -> None:
        """(Re)write the EPP's endpoints file with the named endpoints (default: all).

        Written to a temporary file and renamed into place, so the EPP's watch never
        reads a half-written file.
        """
        wanted = [ep for ep in self.endpoints if names is None or ep.name in names]
        entries = [
            {
                "name": ep.name,
                "namespace": "default",
                "address": "127.0.0.1",
                "port": str(ep.port),
                "labels": self._labels(ep),
            }
            for ep in wanted
        ]
        partial = self.endpoints_file.with_suffix(".partial")
        partial.write_text(yaml.safe_dump({"endpoints": entries}, sort_keys=False))
        partial.replace(self.endpoints_file)

    def _labels(self, ep: _Endpoint) -> dict[str, str]:
        labels = {ROLE_LABEL: ep.role}
        if self.options.kv_connector == "sglang" and ep.role in ("prefill", "decode"):
            # Those engines run in SGLang mode and export SGLang's metric names.
            labels[ENGINE_LABEL] = "sglang"
        return labels

    async def _start_epp(self) -> int:
        endpoints_file = self.endpoints_file
        self.write_endpoints()
        if self.options.epp_config is not None:
            config_args = [f"--config-file={self.options.epp_config}"]
        else:
            config_text = default_epp_config(
                endpoints_file,
                self.options.non_cached_tokens,
                encode=self.options.encode > 0,
                watch_interval_s=self.options.discovery_watch_interval_s,
            )
            if self.options.flow_control:
                from examples.local_stack.flow_control import flow_control_config, write_objects

                config_text = flow_control_config(config_text)
                objects = write_objects(self.workdir / "api-objects.yaml", self.options.model)
                config_args_extra = [f"--api-objects-file={objects}"]
            else:
                config_args_extra = []
            (self.workdir / "epp-config.yaml").write_text(config_text)
            config_args = [f"--config-file={self.workdir / 'epp-config.yaml'}", *config_args_extra]
        grpc_port, self.epp_health_port = free_port(), free_port()
        self.epp_grpc_port = grpc_port
        self.epp_metrics_port = free_port()
        args = [
            f"--grpc-port={grpc_port}",
            f"--grpc-health-port={self.epp_health_port}",
            f"--metrics-port={self.epp_metrics_port}",
            "--bind-address=127.0.0.1",
            "--secure-serving=false",
            # No Kubernetes API here to review /metrics callers; no trace collector; a
            # stopped EPP has no Service endpoints to drain from.
            "--metrics-endpoint-auth=false",
            "--tracing=false",
            "--drain-timeout=0s",
            "--enable-grpc-stream-metrics",
            *config_args,
            *self.options.epp_args,
        ]
        self.epp = await self._spawn(
            ManagedProcess("epp", self._python("epp", *args), self.workdir)
        )
        await self.wait_epp_ready()
        return grpc_port

    async def epp_ready(self) -> bool:
        """Whether the EPP's gRPC health service reports readiness (False if unreachable)."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.epp_health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service="readiness"), timeout=1
                )
            except grpc.aio.AioRpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def wait_epp_ready(self, deadline_s: float = _READY_DEADLINE_S) -> None:
        assert self.epp is not None, "stack not started"
        await wait_until(self.epp_ready, "epp", deadline_s, self.epp.check_alive)

    async def restart_epp(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """End the EPP with ``sig`` and start it again on the same ports.

        SIGKILL is a crash (in-flight ext_proc streams are cut); SIGTERM is a graceful
        restart (in-flight streams drain first). Envoy reconnects on its next request.
        """
        old = self.epp
        assert old is not None, "stack not started"
        assert old.proc is not None, "stack not started"
        if old.proc.returncode is None:
            old.proc.send_signal(sig)
        try:
            await asyncio.wait_for(old.proc.wait(), _STOP_DEADLINE_S)
        except TimeoutError:
            old.proc.kill()
            await old.proc.wait()
            raise TimeoutError(
                f"the EPP did not exit within {_STOP_DEADLINE_S:.0f}s of {sig.name}"
            ) from None
        new = ManagedProcess(old.name, old.argv, self.workdir, old.env)
        self.processes[self.processes.index(old)] = new
        self.epp = new
        await new.start()
        await self.wait_epp_ready()

    async def _start_envoy(self, session: aiohttp.ClientSession, epp_port: int) -> None:
        config = gateway_config(
            epp_port,
            listen_port=self.options.gateway_port,
            epp_ping_interval_s=self.options.epp_ping_interval_s,
            epp_ping_timeout_s=self.options.epp_ping_timeout_s,
        )
        base_id = 4000 + os.getpid() % 10_000
        self.envoy = EnvoyProcess(config, self.workdir, base_id)
        await self._spawn(self.envoy)
        await self.envoy.wait_ready(session, _READY_DEADLINE_S)

    def summary(self) -> str:
        lines = [
            "disagg local stack is up",
            f"  gateway:  {self.gateway_url}",
            *(f"  {ep.role:8}  {ep.name} at 127.0.0.1:{ep.port}" for ep in self.endpoints),
            f"  EPP metrics: http://127.0.0.1:{self.epp_metrics_port}/metrics",
            f"  logs:     {self.workdir}",
            f"  pids:     {' '.join(str(p.pid) for p in self.processes)}",
            "",
            "Try:",
            f"  curl -s {self.gateway_url}/v1/chat/completions \\",
            "    -H 'content-type: application/json' \\",
            f'    -d \'{{"model": "{self.options.model}", "max_tokens": 16, '
            f'"messages": [{{"role": "user", "content": "{SAMPLE_PROMPT}"}}]}}\'',
            "",
            "The first request runs prefill on a prefill engine and decode on a decode engine;",
            "the same request again is decode-only, because the decode pod now holds its prefix.",
            "",
            "Ctrl-C stops everything.",
        ]
        return "\n".join(lines)


def _http_ok(session: aiohttp.ClientSession, url: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        async with session.get(url) as resp:
            return resp.status == 200

    return check
