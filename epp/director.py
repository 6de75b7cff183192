"""The Director: the scheduling half of the EPP behind ``epp.decision.DecisionMaker``.

It owns the datastore, the discovery source (a discovery plugin from the config, or
the Kubernetes InferencePool), the metrics scraper and the scheduler built from the
``EndpointPickerConfig``. ``decide`` parses one request, runs one scheduling cycle and
returns a ``Decision`` whose hooks release the in-flight counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter

from prometheus_client import Counter

from epp.config import ConfigError, SchedulerConfig, load_config
from epp.datastore import Datastore, Endpoint, address_host
from epp.decision import Decision, DecisionMaker, InternalError, NoEndpoints, SchedulingError
from epp.engine_metrics import EngineMappings
from epp.metrics import EppMetrics
from epp.plugins.base import Discovery, Plugin
from epp.request import parse_request
from epp.scheduling.cycle import CycleState
from epp.scheduling.scheduler import Tracking
from epp.scraper import MetricsScraper

__all__ = ["ConfigError", "Director", "DirectorSettings", "build_director", "subset_endpoints"]

log = logging.getLogger(__name__)

# Distinct model_name label values before further names are counted as "other".
_MAX_MODEL_LABELS = 64


@dataclass
class DirectorSettings:
    config_text: str | None = None
    config_file: str | None = None
    pool_name: str | None = None
    pool_namespace: str = "default"
    refresh_metrics_interval_s: float = 0.05
    metrics_staleness_threshold_s: float = 2.0
    max_scrapes_per_second: float = 500.0
    # Upper bound of one /metrics scrape; defaults to min(1 s, staleness threshold).
    metrics_scrape_timeout_s: float | None = None
    # Kubernetes API access: None = in-cluster config, else kubeconfig; an explicit
    # server URL (tests, proxies) skips both.
    kube_api_server: str | None = None
    kubeconfig: str | None = None
    # Metric names per engine type (None: the built-in engines, vLLM by default).
    engine_metrics: EngineMappings | None = None


class Director(DecisionMaker):
    """Implements ``DecisionMaker``; create with ``build_director``."""

    def __init__(
        self, settings: DirectorSettings, config: SchedulerConfig, metrics: EppMetrics
    ) -> None:
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self.datastore = Datastore()
        timeout = settings.metrics_scrape_timeout_s or min(
            1.0, settings.metrics_staleness_threshold_s
        )
        self.scraper = MetricsScraper(
            self.datastore,
            interval_s=settings.refresh_metrics_interval_s,
            timeout_s=timeout,
            max_scrapes_per_second=settings.max_scrapes_per_second,
            engines=settings.engine_metrics,
        )
        self.discovery: Discovery | None = config.discovery
        self._started = False
        self._gauge_task: asyncio.Task[None] | None = None
        self._request_counters: dict[str, Counter] = {}
        self._scheduler = config.scheduler
        self._threshold = settings.metrics_staleness_threshold_s
        # Staleness is logged on each move between fresh and stale, not on every tick.
        self._known_since: dict[str, float] = {}
        self._stale: set[str] = set()
        self._decision_counters = {
            t: metrics.disagg_decisions.labels(decision_type=t)
            for t in ("decode-only", "prefill-decode", "encode-decode", "encode-prefill-decode")
        }
        for plugin in config.plugins:
            self._instrument(plugin)
            plugin.register_metrics(metrics.registry)
        for profile in config.scheduler.profiles.values():
            self._instrument(profile.picker)
        self._instrument(config.scheduler.handler)
        self.datastore.add_listener(self._on_endpoints_changed)

    def _instrument(self, plugin: Plugin) -> None:
        child = self.metrics.plugin_duration.labels(
            plugin_type=plugin.type_name, plugin_name=plugin.name
        )
        plugin.observe = child.observe

    def _on_endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        now = self.datastore.clock()
        for ep in removed:
            self._known_since.pop(ep.key, None)
            self._stale.discard(ep.key)
        for ep in added:
            self._known_since[ep.key] = now
        for plugin in self.config.plugins:
            plugin.endpoints_changed(added, removed)
        self.metrics.ready_endpoints.set(self.datastore.count_fresh(self._threshold))
        counts: dict[str, int] = {}
        for ep in self.datastore.snapshot():
            role = ep.role or "unlabelled"
            counts[role] = counts.get(role, 0) + 1
        self.metrics.endpoints.clear()
        for role, n in counts.items():
            self.metrics.endpoints.labels(role=role).set(n)

    async def start(self) -> None:
        """Start discovery (initial endpoints loaded before returning) and scraping."""
        if self._started:
            return
        self._started = True
        await self.scraper.start()
        if self.discovery is None:
            self.discovery = await self._kubernetes_discovery()
        await self.discovery.start(self.datastore)
        self._gauge_task = asyncio.create_task(self._update_ready_gauge(), name="ready gauge")
        log.info(
            "director started: %d endpoints, profiles %s",
            len(self.datastore),
            ", ".join(self._scheduler.profiles),
        )

    async def _kubernetes_discovery(self) -> Discovery:
        from epp.discovery.kubernetes import InferencePoolDiscovery

        s = self.settings
        if not s.pool_name:
            raise ConfigError("no endpoint discovery: set --pool-name or a discovery plugin")
        return InferencePoolDiscovery(
            pool_name=s.pool_name,
            namespace=s.pool_namespace,
            api_server=s.kube_api_server,
            kubeconfig=s.kubeconfig,
        )

    async def _update_ready_gauge(self) -> None:
        # Freshness changes without membership changes, so the gauge is refreshed on a timer.
        period = max(self.settings.refresh_metrics_interval_s, 0.5)
        while True:
            self.metrics.ready_endpoints.set(self.datastore.count_fresh(self._threshold))
            self._report_staleness(self.datastore.clock())
            await asyncio.sleep(period)

    def _report_staleness(self, now: float) -> None:
        """Log each endpoint's move from fresh to stale metrics and back, once per move."""
        for ep in self.datastore.snapshot():
            if ep.is_fresh(now, self._threshold):
                if ep.key in self._stale:
                    self._stale.discard(ep.key)
                    log.info("endpoint %s (%s): metrics fresh again", ep.key, ep.name)
                continue
            # A new endpoint gets one threshold's time for its first scrape.
            known_for = now - self._known_since.get(ep.key, now)
            if ep.key in self._stale or known_for <= self._threshold:
                continue
            self._stale.add(ep.key)
            updated = ep.metrics.updated_at
            age = f"last scraped {now - updated:.1f}s ago" if updated else "never scraped"
            log.warning(
                "endpoint %s (%s): metrics stale (%s); scored as fully loaded until its "
                "/metrics answers again",
                ep.key,
                ep.name,
                age,
            )

    async def stop(self) -> None:
        """Stop discovery and scraping; safe to call more than once."""
        if not self._started:
            return
        self._started = False
        task, self._gauge_task = self._gauge_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.discovery is not None:
            await self.discovery.stop()
        await self.scraper.stop()
        for plugin in self.config.plugins:
            await plugin.aclose()

    def is_ready(self) -> bool:
        return self._started and len(self.datastore) > 0

    def _count_request(self, model: str) -> None:
        # The model name comes from the client: bound the label's cardinality.
        child = self._request_counters.get(model)
        if child is None:
            label = model if len(self._request_counters) < _MAX_MODEL_LABELS else "other"
            child = self.metrics.requests.labels(model_name=label)
            if label == model:
                self._request_counters[model] = child
        child.inc()

    def _reassign(self, tracking: Tracking, request_id: str, served: str) -> None:
        """The gateway reports that ``served``, not the pick, served the request."""
        picked = tracking.result.targets(tracking.result.primary)[0].key
        endpoint = self.datastore.find(served)
        if endpoint is None:
            log.warning(
                "request %s: the gateway reports it was served by %s, which is not a known "
                "endpoint; its load stays charged to %s",
                request_id or "-",
                served,
                picked,
            )
            return
        if endpoint.key == picked:
            return
        log.info(
            "request %s: served by %s, not the picked %s; its load and prefix are charged to %s",
            request_id or "-",
            endpoint.key,
            picked,
            endpoint.key,
        )
        tracking.reassign(endpoint)

    async def decide(
        self,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        subset: Sequence[str] | None,
    ) -> Decision:
        t0 = perf_counter()
        request = parse_request(path, headers, body)
        self._count_request(request.model)
        endpoints: Sequence[Endpoint] = self.datastore.snapshot()
        if not endpoints:
            raise NoEndpoints("no endpoints known")
        destinations = None if subset is None else subset_endpoints(endpoints, subset)
        if destinations is not None and not destinations:
            raise NoEndpoints(
                f"none of the {len(subset or ())} endpoints in the gateway's subset hint "
                "is a known endpoint"
            )
        cycle = CycleState(request, time.monotonic(), self._threshold)
        try:
            await self._scheduler.prefetch(cycle, endpoints)
            result = self._scheduler.schedule(cycle, endpoints, destinations)
            tracking = self._scheduler.track(cycle, result)
        except SchedulingError:
            raise
        except Exception as exc:
            log.exception("scheduling failed (request %s)", request.request_id or "-")
            raise InternalError(f"scheduling failed: {type(exc).__name__}") from exc
        decode = result.targets(result.primary)
        prefill = result.targets(result.prefill_profile)
        encoders = [ep.key for ep in result.targets(result.encode_profile)]
        if encoders:
            decision_type = "encode-prefill-decode" if prefill else "encode-decode"
        else:
            decision_type = "prefill-decode" if prefill else "decode-only"
        decision = Decision(
            decode=decode[0].key,
            prefill=prefill[0].key if prefill else None,
            encoders=encoders,
            decision_type=decision_type,
            decode_fallbacks=[ep.key for ep in decode[1:]],
            release_prefill=tracking.release_stages,
            release_all=tracking.release_all,
            reassign=lambda served: self._reassign(tracking, request.request_id, served),
        )
        self._decision_counters[decision_type].inc()
        self.metrics.scheduler_e2e_duration.observe(perf_counter() - t0)
        return decision


def subset_endpoints(endpoints: Sequence[Endpoint], subset: Sequence[str]) -> list[Endpoint]:
    """The endpoints the gateway's subset hint allows, matched by host: the hint's ports
    are ignored, as llm-d does (a pod's ports are all one engine's)."""
    hosts = {address_host(entry) for entry in subset}
    return [ep for ep in endpoints if ep.host in hosts]


async def build_director(settings: DirectorSettings, metrics: EppMetrics) -> Director:
    """Load and validate the configuration; raises ``ConfigError`` naming the problem."""
    config = await asyncio.to_thread(
        load_config,
        settings.config_text,
        settings.config_file,
        pool_configured=settings.pool_name is not None,
    )
    if config.discovery is None and not settings.pool_name:
        raise ConfigError(
            "no endpoint discovery: set --pool-name or configure a 'file-discovery' plugin"
        )
    return Director(settings, config, metrics)
