"""Scrapes every endpoint's ``/metrics`` on an interval into the datastore.

One task per endpoint, started and cancelled as discovery adds and removes endpoints,
over one aiohttp session (its pool is keyed by host, so a scrape's cost does not grow
with the number of endpoints; httpx's pool scans every connection it holds on each
request, and measured 3-4x more CPU per scrape). Each scrape is bounded by a timeout (at
most the staleness threshold); a failed scrape leaves the old values to age into
staleness rather than inventing fresh ones.

Scraping costs CPU on the loop that also schedules requests, so the scraper keeps to a
budget of scrapes per second: with many endpoints the interval stretches (and says so in
the log) instead of starving the ext_proc streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Sequence

import aiohttp

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


# The Prometheus text format's sample line: name, optional {labels}, value, [timestamp].
_SAMPLE = re.compile(
    r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?[ \t]+(\S+)'
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
_UNESCAPE = re.compile(r"\\(.)")


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return _UNESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The samples of the wanted series, by name.

    A real engine's page has hundreds of histogram lines, and the general Prometheus
    parser costs close to a millisecond even on a small page; only the lines used are
    picked out (in C, by ``str.find``) and parsed here.
    """
    text = "\n" + text
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for name in _WANTED:
        lines: list[str] = []
        _lines_of(text, f"\n{name}", lines)
        for line in lines:
            match = _SAMPLE.match(line)
            if match is None:
                continue
            try:
                value = float(match.group(3))
            except ValueError:
                continue
            labels = {k: _unescape(v) for k, v in _LABEL.findall(match.group(2) or "")}
            found.setdefault(name, []).append((labels, value))
    return found


def parse_vllm_metrics(text: str, now: float) -> EndpointMetrics:
    """The scheduling signals from a vLLM Prometheus text page (summed over models)."""
    out = EndpointMetrics(updated_at=now)
    found = _samples(text)

    def values(*names: str) -> list[float]:
        return [v for name in names for _, v in found.get(name, ())]

    out.waiting = sum(values("vllm:num_requests_waiting"))
    out.running = sum(values("vllm:num_requests_running"))
    usage = values("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    if usage:
        out.kv_usage = min(1.0, max(0.0, max(usage)))
    for labels, _ in found.get("vllm:cache_config_info", ()):
        bs = labels.get("block_size")
        if bs and bs.isdigit():
            out.block_size = int(bs)
        blocks = labels.get("num_gpu_blocks")
        if blocks and blocks.isdigit():
            out.num_gpu_blocks = int(blocks)
    # One sample per state change; the value is its timestamp, latest wins.
    lora_ts = -1.0
    for labels, value in found.get("vllm:lora_requests_info", ()):
        if value >= lora_ts:
            lora_ts = value
            out.running_loras = _split(labels.get("running_lora_adapters"))
            out.waiting_loras = _split(labels.get("waiting_lora_adapters"))
            max_lora = labels.get("max_lora", "")
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
        max_scrapes_per_second: float = 500.0,
    ) -> None:
        self.datastore = datastore
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.max_scrapes_per_second = max_scrapes_per_second
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = False
        self._stretched_for = 0
        self.scrapes_ok = 0
        self.scrapes_failed = 0

    @property
    def effective_interval_s(self) -> float:
        """The configured interval, stretched to keep within the scrape budget."""
        return max(self.interval_s, len(self._tasks) / self.max_scrapes_per_second)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            # Keep-alive shorter than vLLM's 5 s so a reused connection is never stale.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0),
            auto_decompress=False,
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
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        interval = self.effective_interval_s
        if interval > self.interval_s and len(self._tasks) != self._stretched_for:
            self._stretched_for = len(self._tasks)
            log.warning(
                "scraping %d endpoints every %.3fs instead of %.3fs to stay within %.0f "
                "scrapes/s; keep --metrics-staleness-threshold above that",
                len(self._tasks), interval, self.interval_s, self.max_scrapes_per_second,
            )  # fmt: skip

    async def scrape_once(self, endpoint: Endpoint) -> bool:
        """One bounded scrape; updates the endpoint's metrics on success."""
        session = self._session
        if session is None:
            raise RuntimeError("scraper not started")
        try:
            async with session.get(f"{endpoint.url}/metrics") as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                raw = await resp.content.read(_MAX_BODY + 1)
            if len(raw) > _MAX_BODY:
                raise ValueError("metrics page too large")
            text = raw.decode("utf-8", errors="replace")
            endpoint.metrics = parse_vllm_metrics(text, time.monotonic())
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self.scrapes_failed += 1
            log.debug("scrape of %s failed: %s", endpoint.key, exc)
            return False
        self.scrapes_ok += 1
        return True

    async def _loop(self, endpoint: Endpoint) -> None:
        me = asyncio.current_task()
        while True:
            started = time.monotonic()
            await self.scrape_once(endpoint)
            # A cancellation that lands as a client timeout fires is reported by aiohttp
            # as that timeout; membership, not the exception, decides whether to go on.
            if self._tasks.get(endpoint.key) is not me:
                return
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.effective_interval_s - elapsed))
