"""Scrapes every endpoint's ``/metrics`` on an interval into the datastore.

One pooled ``httpx.AsyncClient`` for all endpoints; one task per endpoint, started and
cancelled as discovery adds and removes endpoints. Each scrape is bounded by a timeout
(at most the staleness threshold); a failed scrape leaves the old values to age into
staleness rather than inventing fresh ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from epp.datastore import Datastore, Endpoint, EndpointMetrics

__all__ = ["MetricsScraper", "parse_vllm_metrics"]

log = logging.getLogger(__name__)

# Bounds a misbehaving engine's /metrics body; real ones are tens of KB.
_MAX_BODY = 4 * 1024 * 1024


def _split(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(v for v in value.split(",") if v)


_WANTED = (
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:cache_config_info",
    "vllm:lora_requests_info",
)


def _lines_of(text: str, prefix: str, out: list[str]) -> None:
    """Append every line of ``text`` (which starts with a newline) that starts with
    ``prefix`` (newline + name) followed by '{' or ' '; str.find keeps the scan in C."""
    k = len(prefix) - 1  # index, within the line, of the character after the name
    pos = text.find(prefix)
    while pos != -1:
        end = text.find("\n", pos + 1)
        line = text[pos + 1 : end] if end != -1 else text[pos + 1 :]
        if len(line) > k and line[k] in "{ ":
            out.append(line)
        pos = text.find(prefix, end) if end != -1 else -1


def _relevant(text: str) -> str:
    # A real engine's page has hundreds of histogram lines and the Prometheus parser
    # costs tens of microseconds per sample, so only the lines used are handed to it.
    text = "\n" + text
    out: list[str] = []
    for name in _WANTED:
        _lines_of(text, f"\n# TYPE {name}", out)
        _lines_of(text, f"\n{name}", out)
    return "\n".join(out) + "\n"


def parse_vllm_metrics(text: str, now: float) -> EndpointMetrics:
    """The scheduling signals from a vLLM Prometheus text page (summed over models)."""
    out = EndpointMetrics(updated_at=now)
    lora_ts = -1.0
    for family in text_string_to_metric_families(_relevant(text)):
        name = family.name
        if name == "vllm:num_requests_waiting":
            out.waiting = sum(s.value for s in family.samples)
        elif name == "vllm:num_requests_running":
            out.running = sum(s.value for s in family.samples)
        elif name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            values = [s.value for s in family.samples]
            if values:
                out.kv_usage = min(1.0, max(0.0, max(values)))
        elif name == "vllm:cache_config_info":
            for s in family.samples:
                bs = s.labels.get("block_size")
                if bs and bs.isdigit():
                    out.block_size = int(bs)
                blocks = s.labels.get("num_gpu_blocks")
                if blocks and blocks.isdigit():
                    out.num_gpu_blocks = int(blocks)
        elif name == "vllm:lora_requests_info":
            # One sample per state change; the value is its timestamp, latest wins.
            for s in family.samples:
                if s.value >= lora_ts:
                    lora_ts = s.value
                    out.running_loras = _split(s.labels.get("running_lora_adapters"))
                    out.waiting_loras = _split(s.labels.get("waiting_lora_adapters"))
                    max_lora = s.labels.get("max_lora", "")
                    out.max_lora = int(max_lora) if max_lora.isdigit() else None
    return out


class MetricsScraper:
    """Keeps every endpoint's metrics fresh while started."""

    def __init__(
        self,
        datastore: Datastore,
        *,
        interval_s: float = 0.05,
        timeout_s: float = 1.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.datastore = datastore
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._own_client = client is None
        self._client = client
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = False
        self.scrapes_ok = 0
        self.scrapes_failed = 0

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=256),
            )
        self._started = True
        self.datastore.add_listener(self._on_change)
        self._on_change(list(self.datastore.snapshot()), [])

    async def stop(self) -> None:
        self._started = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def _on_change(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        if not self._started:
            return
        for ep in removed:
            task = self._tasks.pop(ep.key, None)
            if task is not None:
                task.cancel()
        for ep in added:
            if ep.key not in self._tasks:
                self._tasks[ep.key] = asyncio.create_task(self._loop(ep), name=f"scrape {ep.key}")

    async def scrape_once(self, endpoint: Endpoint) -> bool:
        """One bounded scrape; updates the endpoint's metrics on success."""
        client = self._client
        if client is None:
            raise RuntimeError("scraper not started")
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await client.get(f"{endpoint.url}/metrics")
            if resp.status_code != 200:
                raise ValueError(f"HTTP {resp.status_code}")
            if len(resp.content) > _MAX_BODY:
                raise ValueError("metrics page too large")
            endpoint.metrics = parse_vllm_metrics(resp.text, time.monotonic())
        except (TimeoutError, httpx.HTTPError, ValueError) as exc:
            self.scrapes_failed += 1
            log.debug("scrape of %s failed: %s", endpoint.key, exc)
            return False
        self.scrapes_ok += 1
        return True

    async def _loop(self, endpoint: Endpoint) -> None:
        while True:
            started = time.monotonic()
            await self.scrape_once(endpoint)
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.interval_s - elapsed))
