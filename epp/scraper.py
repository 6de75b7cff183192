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

Each endpoint's page is read with its engine's metric names (``epp.engine_metrics``: the
pod's engine-type label, vLLM by default). A page that has none of the engine's load
series (an SGLang pod read with vLLM's names, say) is a failed scrape, logged once with
the names it lacks: the endpoint goes stale and is scored as busy instead of looking idle.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp

from epp.datalayer.endpoint_loops import EndpointLoops
from epp.datalayer.scrape_target import ScrapeTarget
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.engine_metrics import BUILTIN_ENGINES, EngineMapping, EngineMappings, MetricSpec

__all__ = ["MetricsScraper", "ParsedMetrics", "parse_metrics", "parse_vllm_metrics"]

log = logging.getLogger(__name__)

# Bounds a misbehaving engine's /metrics body; real ones are tens of KB.
_MAX_BODY = 4 * 1024 * 1024


def _split(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(v for v in value.split(",") if v)


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


Samples = dict[str, list[tuple[dict[str, str], float]]]


def _samples(text: str, names: Sequence[str]) -> Samples:
    """The samples of the wanted series, by name.

    A real engine's page has hundreds of histogram lines, and the general Prometheus
    parser costs close to a millisecond even on a small page; only the lines used are
    picked out (in C, by ``str.find``) and parsed here.
    """
    text = "\n" + text
    found: Samples = {}
    for name in names:
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


def _select(found: Samples, spec: MetricSpec | None) -> list[tuple[dict[str, str], float]]:
    if spec is None:
        return []
    return [(labels, v) for labels, v in found.get(spec.name, ()) if spec.matches(labels)]


def _label_int(labels: Mapping[str, str], name: str) -> int | None:
    value = labels.get(name, "")
    return int(value) if value.isdigit() else None


@dataclass(frozen=True, slots=True)
class ParsedMetrics:
    metrics: EndpointMetrics
    # Load signals (``waiting``, ``running``, ``kv_usage``) whose series the mapping
    # names and the page lacks, with the series' selector.
    missing: Mapping[str, str]
    # True when the mapping names load series and the page has none of them.
    no_load_signal: bool


def parse_metrics(text: str, mapping: EngineMapping, now: float) -> ParsedMetrics:
    """The scheduling signals from a Prometheus text page, read with ``mapping``: queue
    and running summed over the matching series (one per model or data-parallel rank),
    KV-cache usage the highest of them."""
    out = EndpointMetrics(updated_at=now)
    found = _samples(text, mapping.metric_names)
    missing: dict[str, str] = {}
    for attr, spec in (("waiting", mapping.queued), ("running", mapping.running)):
        samples = _select(found, spec)
        if spec is not None and not samples:
            missing[attr] = str(spec)
        setattr(out, attr, sum(v for _, v in samples))
    for spec in mapping.kv_usage:
        usage = [v for _, v in _select(found, spec)]
        if usage:
            out.kv_usage = min(1.0, max(0.0, max(usage)))
            break
    else:
        if mapping.kv_usage:
            missing["kv_usage"] = str(mapping.kv_usage[0])
    for labels, _ in _select(found, mapping.cache_info):
        out.block_size = _label_int(labels, mapping.block_size_label) or out.block_size
        out.num_gpu_blocks = _label_int(labels, mapping.num_blocks_label) or out.num_gpu_blocks
    block_size = [v for _, v in _select(found, mapping.cache_block_size)]
    if block_size and block_size[0] >= 1:
        out.block_size = int(block_size[0])
    num_blocks = [v for _, v in _select(found, mapping.cache_num_blocks)]
    if num_blocks and num_blocks[0] >= 1:
        out.num_gpu_blocks = int(num_blocks[0])
    # One sample per state change; the value is its timestamp, latest wins.
    lora_ts = -1.0
    for labels, value in _select(found, mapping.lora):
        if value >= lora_ts:
            lora_ts = value
            out.running_loras = _split(labels.get("running_lora_adapters"))
            out.waiting_loras = _split(labels.get("waiting_lora_adapters"))
            out.max_lora = _label_int(labels, "max_lora")
    signals = mapping.load_signal_count
    return ParsedMetrics(out, missing, signals > 0 and len(missing) == signals)


def parse_vllm_metrics(text: str, now: float) -> EndpointMetrics:
    """The scheduling signals from a vLLM page (the default engine)."""
    return parse_metrics(text, BUILTIN_ENGINES["vllm"], now).metrics


class MetricsScraper:
    """Keeps every endpoint's metrics fresh while started."""

    def __init__(
        self,
        datastore: Datastore,
        *,
        interval_s: float = 0.05,
        timeout_s: float = 1.0,
        max_scrapes_per_second: float = 500.0,
        engines: EngineMappings | None = None,
        target: ScrapeTarget | None = None,
    ) -> None:
        self.datastore = datastore
        self.engines = engines or EngineMappings()
        self.target = target if target is not None else ScrapeTarget()
        # Per endpoint, the missing series last warned about (one line per change).
        self._warned: dict[str, tuple[str, ...]] = {}
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.max_scrapes_per_second = max_scrapes_per_second
        self._session: aiohttp.ClientSession | None = None
        self._loops = EndpointLoops(
            "scrape",
            self.scrape_once,
            lambda: self.effective_interval_s,
            forget=lambda key: self._warned.pop(key, None),
            changed=self._warn_if_stretched,
        )
        self._stretched_for = 0
        self.scrapes_ok = 0
        self.scrapes_failed = 0

    @property
    def effective_interval_s(self) -> float:
        """The configured interval, stretched to keep within the scrape budget."""
        return max(self.interval_s, len(self._loops) / self.max_scrapes_per_second)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            # Keep-alive shorter than vLLM's 5 s so a reused connection is never stale.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0),
            auto_decompress=False,
        )
        self._loops.start(self.datastore)

    async def stop(self) -> None:
        await self._loops.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _warn_if_stretched(self) -> None:
        interval = self.effective_interval_s
        if interval > self.interval_s and len(self._loops) != self._stretched_for:
            self._stretched_for = len(self._loops)
            log.warning(
                "scraping %d endpoints every %.3fs instead of %.3fs to stay within %.0f "
                "scrapes/s; keep --metrics-staleness-threshold above that",
                len(self._loops), interval, self.interval_s, self.max_scrapes_per_second,
            )  # fmt: skip

    async def scrape_once(self, endpoint: Endpoint) -> bool:
        """One bounded scrape; updates the endpoint's metrics on success."""
        session = self._session
        if session is None:
            raise RuntimeError("scraper not started")
        try:
            target = self.target
            async with session.get(target.url(endpoint), ssl=target.ssl or True) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                raw = await resp.content.read(_MAX_BODY + 1)
            if len(raw) > _MAX_BODY:
                raise ValueError("metrics page too large")
            text = raw.decode("utf-8", errors="replace")
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self.scrapes_failed += 1
            log.debug("scrape of %s failed: %s", endpoint.key, exc)
            return False
        mapping = self.engines.for_labels(endpoint.labels)
        now = time.monotonic()
        parsed = parse_metrics(text, mapping, now)
        self._report_missing(endpoint, mapping, parsed)
        if parsed.no_load_signal:
            # Not this engine's page (a pod labelled for another engine, or none): its
            # metrics go stale, so it is scored as busy, never as idle.
            self.scrapes_failed += 1
            return False
        previous = endpoint.metrics
        for attr in parsed.missing:  # a series the engine dropped keeps its last value
            setattr(parsed.metrics, attr, getattr(previous, attr))
        endpoint.metrics = parsed.metrics
        if self.target.on_page is not None:
            self.target.on_page(endpoint, text, now)
        self.scrapes_ok += 1
        return True

    def _report_missing(
        self, endpoint: Endpoint, mapping: EngineMapping, parsed: ParsedMetrics
    ) -> None:
        missing = tuple(parsed.missing.values())
        if self._warned.get(endpoint.key, ()) == missing:
            return
        self._warned[endpoint.key] = missing
        if not missing:
            log.info("endpoint %s (%s): engine metrics found again", endpoint.key, endpoint.name)
            return
        engine = self.engines.engine_type(endpoint.labels)
        how = f"label {self.engines.label_key}={engine}" if engine else "no engine label"
        log.warning(
            "endpoint %s (%s): /metrics lacks %s, read as engine '%s' (%s)%s",
            endpoint.key,
            endpoint.name,
            ", ".join(missing),
            mapping.name,
            how,
            "; its metrics are left to go stale"
            if parsed.no_load_signal
            else "; the last values are kept",
        )
