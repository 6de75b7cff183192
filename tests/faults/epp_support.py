"""The EPP-side fault scenarios' shared pieces: one local stack, a client, probes.

The stack has one prefill engine and two decode engines (each behind its sidecar), a
file-discovery EPP that re-reads its endpoints file every 100 ms and treats metrics as
stale after 1 s, and the real Envoy in front. Tests share it per module; each restores
what it changed (faults, endpoints file, EPP process) and checks health on the way out.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from examples.local_stack import LocalStack, StackOptions
from tests.conftest import eventually

__all__ = [
    "EPP_PING_INTERVAL_S",
    "EPP_PING_TIMEOUT_S",
    "STALENESS_S",
    "EppStack",
    "Outcome",
    "start_epp_stack",
]

STALENESS_S = 1.0
# Envoy pings the EPP this often, and gives up on it after this long without an answer.
EPP_PING_INTERVAL_S = 0.5
EPP_PING_TIMEOUT_S = 2.0
_REQUEST_DEADLINE_S = 10.0
_unique = itertools.count()


@dataclass
class Outcome:
    """What one client saw: a status and body, or the transport error that ended it."""

    status: int | None
    body: bytes
    started: float
    elapsed: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    def json_error(self) -> dict[str, Any] | None:
        """The OpenAI-shaped error object of a refusal, or None if the body is not one."""
        try:
            doc = json.loads(self.body)
        except ValueError:
            return None
        error = doc.get("error") if isinstance(doc, dict) else None
        return error if isinstance(error, dict) and error.get("message") else None


@dataclass
class EppStack:
    stack: LocalStack
    session: aiohttp.ClientSession
    endpoints_changed: bool = False

    # -- the client ---------------------------------------------------------------
    @staticmethod
    def prompt(long: bool = False) -> str:
        """A prompt no earlier request shares a prefix with; long ones go P/D."""
        n = next(_unique)
        if long:
            return f"request {n}: " + " ".join(f"w{n}x{i}" for i in range(64))
        return f"hi {n}"

    async def complete(
        self, prompt: str, *, stream: bool = False, max_tokens: int = 3, chat: bool = False
    ) -> Outcome:
        """One completion through Envoy, bounded; transport errors and the deadline are
        outcomes (``error``), not exceptions."""
        body: dict[str, Any] = {"model": "sim-model", "max_tokens": max_tokens}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if stream:
            body["stream"] = True
        path = "/v1/chat/completions" if chat else "/v1/completions"
        started = time.monotonic()
        status: int | None = None
        data = b""
        try:
            async with (
                asyncio.timeout(_REQUEST_DEADLINE_S),
                self.session.post(f"{self.stack.gateway_url}{path}", json=body) as resp,
            ):
                status = resp.status
                data = await resp.read()
        except TimeoutError:
            return Outcome(status, data, started, time.monotonic() - started, "hang")
        except (aiohttp.ClientError, ConnectionError) as err:
            return Outcome(
                status, data, started, time.monotonic() - started, f"{type(err).__name__}: {err}"
            )
        return Outcome(status, data, started, time.monotonic() - started)

    # -- engines --------------------------------------------------------------------
    async def engine_stats(self, url: str) -> dict[str, Any]:
        async with self.session.get(f"{url}/sim/stats") as resp:
            resp.raise_for_status()
            result: dict[str, Any] = await resp.json()
            return result

    async def received(self, url: str, text: str) -> bool:
        """Whether one of the engine's recently recorded requests contains ``text``."""
        recorded = (await self.engine_stats(url))["recorded"]
        return any(text in json.dumps(r["body"]) for r in recorded)

    async def requests_total(self, url: str) -> int:
        return int((await self.engine_stats(url))["requests_total"])

    async def add_fault(self, url: str, **fault: Any) -> None:
        async with self.session.post(f"{url}/sim/faults", json=fault) as resp:
            resp.raise_for_status()

    async def clear_faults(self) -> None:
        for url in self.stack.prefill_engine_urls + self.stack.decode_engine_urls:
            async with self.session.delete(f"{url}/sim/faults") as resp:
                resp.raise_for_status()

    # -- the EPP ----------------------------------------------------------------------
    async def epp_metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample of the EPP's Prometheus page (0 when absent)."""
        url = f"http://127.0.0.1:{self.stack.epp_metrics_port}/metrics"
        async with self.session.get(url) as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in (labels or {}).items()
                ):
                    return float(sample.value)
        return 0.0

    async def endpoint_count(self, role: str) -> int:
        return int(await self.epp_metric("disagg_epp_endpoints", {"role": role}))

    async def set_endpoints(self, names: list[str] | None) -> None:
        """Rewrite the endpoints file (None: all) and wait until the EPP has reloaded it."""
        wanted = [ep for ep in self.stack.endpoints if names is None or ep.name in names]
        self.stack.write_endpoints(names)
        self.endpoints_changed = names is not None

        async def reloaded() -> bool:
            for role in ("prefill", "decode"):
                n = sum(1 for ep in wanted if ep.role == role)
                if await self.endpoint_count(role) != n:
                    return False
            return True

        await eventually(reloaded, f"the EPP reloads its endpoints file ({names})")

    # -- logs ---------------------------------------------------------------------------
    def mark_logs(self) -> None:
        """Remember where every process log ends; ``log_since`` reads from there."""
        for proc in self.stack.processes:
            proc.mark_log()

    def log_since(self, name: str) -> str:
        [proc] = [p for p in self.stack.processes if p.name == name]
        return proc.log_since_mark()

    # -- health -----------------------------------------------------------------------
    async def assert_healthy(self) -> None:
        """Every process alive and healthy, a normal request succeeds, and the EPP's,
        the sidecars' and Envoy's logs name no crash since ``mark_logs``."""
        for proc in self.stack.processes:
            proc.check_alive()
        assert await self.stack.epp_ready(), "EPP readiness is not SERVING"
        for endpoint in self.stack.endpoints:
            if endpoint.role == "decode":
                url = f"http://127.0.0.1:{endpoint.port}/health"
                async with self.session.get(url) as resp:
                    assert resp.status == 200, f"sidecar {endpoint.name} health: {resp.status}"
        for long in (False, True):
            outcome = await self.complete(self.prompt(long))
            assert outcome.ok, f"a normal request failed: {outcome}"
        # The EPP, the sidecars and Envoy; the simulated engines are test doubles.
        for proc in self.stack.processes:
            if proc.name.split("-")[0] not in ("epp", "sidecar", "envoy"):
                continue
            bad = proc.log_alarms()
            assert not bad, f"{proc.name}.log: {bad[:3]}\n{proc.log_since_mark()[-3000:]}"


async def start_epp_stack(workdir: Path) -> EppStack:
    options = StackOptions(
        prefill=1,
        decode=2,
        gateway_port=0,
        zero_latency=True,
        workdir=workdir,
        discovery_watch_interval_s=0.1,
        epp_ping_interval_s=EPP_PING_INTERVAL_S,
        epp_ping_timeout_s=EPP_PING_TIMEOUT_S,
        epp_args=[
            f"--metrics-staleness-threshold={int(STALENESS_S * 1000)}ms",
            "--shutdown-grace=3s",
        ],
    )
    stack = LocalStack(options)
    await stack.start()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
    return EppStack(stack, session)
