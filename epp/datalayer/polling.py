"""The HTTP polling source: one task per endpoint fetches a URL every period and hands
the body to the source's extractors (llm-d's HTTP data source, shared by the DCGM and
models sources).

Each poll is bounded (1 s, as llm-d's step timeout; a 4 MiB body), a failed poll
changes nothing (the attributes it wrote before expire after three periods, at least
1 s), and an endpoint's move from answering to failing and back is logged once each
way. The configured ``interval`` is rounded to a multiple of the EPP's
``--refresh-metrics-interval``; omitted, every tick polls.
"""

from __future__ import annotations

import abc
import functools
import logging
import ssl
import time
from collections.abc import Callable
from typing import Literal

import aiohttp
from pydantic import Field, field_validator, model_validator

from common.durations import parse_duration
from epp.datalayer.base import DataSource, ExtractorGuard
from epp.datalayer.endpoint_loops import EndpointLoops
from epp.datastore import Datastore, Endpoint, format_host_port
from epp.plugins.base import Plugin, PluginParams

__all__ = ["HttpSourceParams", "PollingSource", "client_ssl_context", "rounded_period"]

log = logging.getLogger(__name__)

_MAX_BODY = 4 * 1024 * 1024
_POLL_TIMEOUT_S = 1.0
# A polled attribute outlives this many missed periods (and at least _MIN_LIFETIME_S).
_LIFETIME_PERIODS = 3
_MIN_LIFETIME_S = 1.0


class HttpSourceParams(PluginParams):
    """The parameters every llm-d HTTP data source takes."""

    scheme: Literal["http", "https"] = "http"
    path: str = "/metrics"
    insecure_skip_verify: bool = True
    ca_cert_path: str | None = None
    client_cert_path: str | None = None
    client_key_path: str | None = None
    # Seconds (a Go duration like "1s", or a number); None: every base tick.
    interval: float | None = Field(default=None)

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"path must start with '/', got {value!r}")
        return value

    @field_validator("interval", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float | None:
        if value is None or value == "":
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError("interval must be a duration like '1s'")
        return parse_duration(value)

    @model_validator(mode="after")
    def _cert_pair(self) -> HttpSourceParams:
        if bool(self.client_cert_path) != bool(self.client_key_path):
            raise ValueError("clientCertPath and clientKeyPath must be set together")
        return self


def client_ssl_context(params: HttpSourceParams) -> ssl.SSLContext | None:
    """The TLS client context for https (None for http); ``ValueError`` naming the
    parameter whose file cannot be read."""
    if params.scheme != "https":
        return None
    ctx = ssl.create_default_context()
    if params.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif params.ca_cert_path:
        try:
            ctx.load_verify_locations(cafile=params.ca_cert_path)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"caCertPath {params.ca_cert_path}: {exc}") from None
    if params.client_cert_path and params.client_key_path:
        try:
            ctx.load_cert_chain(params.client_cert_path, params.client_key_path)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"clientCertPath/clientKeyPath {params.client_cert_path}: {exc}"
            ) from None
    return ctx


def rounded_period(interval_s: float | None, base_s: float) -> float:
    """``interval_s`` rounded to the nearest multiple (at least one) of ``base_s``."""
    if not interval_s:
        return base_s
    return max(1, round(interval_s / base_s)) * base_s


class PollingSource(DataSource):
    """Polls every known endpoint; subclasses say where and how to read the body."""

    params: HttpSourceParams

    def __init__(self, params: PluginParams | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.ssl = client_ssl_context(self.params)
        self.period_s = 0.0
        self.polls_ok = 0
        self.polls_failed = 0
        self.guard = ExtractorGuard(self.name)
        self._session: aiohttp.ClientSession | None = None
        self._failing: set[str] = set()
        self._loops = EndpointLoops(
            self.name, self.poll_once, lambda: self.period_s, forget=self._failing.discard
        )
        self._started = False

    @abc.abstractmethod
    def url(self, endpoint: Endpoint) -> str:
        """What to fetch for ``endpoint``."""

    @abc.abstractmethod
    def deliver(self, endpoint: Endpoint, body: bytes, expires_at: float) -> None:
        """Parse ``body`` and hand it to the extractors; ``ValueError`` if unreadable."""

    @property
    def extract_errors(self) -> int:
        return self.guard.errors

    def run_extractors(self, endpoint: Endpoint, each: Callable[[Plugin], None]) -> None:
        """Call ``each`` on every extractor, each guarded (see ``ExtractorGuard``)."""
        for extractor in self.extractors:
            self.guard.run(extractor, endpoint, functools.partial(each, extractor))

    def endpoint_url(self, host: str, port: int) -> str:
        return f"{self.params.scheme}://{format_host_port(host, port)}{self.params.path}"

    async def start(self, datastore: Datastore, base_interval_s: float) -> None:
        if self._started:
            return
        self._started = True
        self.period_s = rounded_period(self.params.interval, base_interval_s)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=_POLL_TIMEOUT_S),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0),
        )
        self._loops.start(datastore)

    async def stop(self) -> None:
        self._started = False
        await self._loops.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def poll_once(self, endpoint: Endpoint) -> bool:
        """One bounded poll; True when the body was fetched and delivered."""
        session = self._session
        if session is None:
            raise RuntimeError(f"data source '{self.name}' is not started")
        url = self.url(endpoint)
        try:
            async with session.get(url, ssl=self.ssl if self.ssl is not None else True) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = await resp.content.read(_MAX_BODY + 1)
            if len(body) > _MAX_BODY:
                raise ValueError(f"response larger than {_MAX_BODY} bytes")
            now = time.monotonic()
            lifetime = max(_LIFETIME_PERIODS * self.period_s, _MIN_LIFETIME_S)
            self.deliver(endpoint, body, now + lifetime)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self.polls_failed += 1
            if endpoint.key not in self._failing:
                self._failing.add(endpoint.key)
                log.warning(
                    "%s: polling %s for endpoint %s failed: %s",
                    self.name, url, endpoint.key, exc or type(exc).__name__,
                )  # fmt: skip
            return False
        self.polls_ok += 1
        if endpoint.key in self._failing:
            self._failing.discard(endpoint.key)
            log.info("%s: endpoint %s answers again", self.name, endpoint.key)
        return True
