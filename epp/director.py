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

from epp import tracing
from epp.config import ConfigError, SchedulerConfig, load_config
from epp.datalayer.base import DataSource
from epp.datalayer.metrics_source import scrape_settings
from epp.datastore import Datastore, Endpoint, address_host, format_host_port
from epp.decision import Decision, DecisionMaker, InternalError, NoEndpoints, SchedulingError
from epp.engine_metrics import EngineMappings
from epp.flowcontrol.errors import AdmissionDenied
from epp.metrics import EppMetrics
from epp.plugins.base import (
    DataProducer,
    Discovery,
    Filter,
    Picker,
    Plugin,
    ProfileHandler,
    Scorer,
)
from epp.plugins.parsers import Parser
from epp.request import ParsedRequest
from epp.requestmgmt.manager import rewrite_body
from epp.requestmgmt.setup import build_request_manager
from epp.scheduling.cycle import REQUEST_HEADERS, RESPONSE_HEADERS, CycleState
from epp.scheduling.scheduler import Tracking
from epp.scraper import MetricsScraper

__all__ = ["ConfigError", "Director", "DirectorSettings", "build_director", "subset_endpoints"]

log = logging.getLogger(__name__)

# llm-d's extension point names (the plugin_duration_seconds label), by plugin kind.
_EXTENSION_POINTS: tuple[tuple[type[Plugin], str], ...] = (
    (Filter, "Filter"),
    (Scorer, "Scorer"),
    (Picker, "Picker"),
    (ProfileHandler, "ProfilePicker"),
    (DataProducer, "DataProducer"),
    (Parser, "RequestParsing"),
)


@dataclass
class DirectorSettings:
    config_text: str | None = None
    config_file: str | None = None
    pool_name: str | None = None
    pool_namespace: str = "default"
    pool_group: str = "inference.networking.k8s.io"
    # Discovery without an InferencePool: a pod label selector and the pods' ports.
    endpoint_selector: str | None = None
    endpoint_target_ports: tuple[int, ...] = ()
    # Ignore the gateway's subset hint (--disable-endpoint-subset-filter).
    disable_subset_filter: bool = False
    # Put the primary profile's scores in the decision (--emit-endpoint-scores).
    emit_endpoint_scores: bool = False
    # Interval of the pool gauges (--refresh-prometheus-metrics-interval).
    pool_metrics_interval_s: float = 5.0
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
    # InferenceObjective/InferenceModelRewrite objects from a file (--api-objects-file)
    # instead of the Kubernetes API.
    api_objects_file: str | None = None
    # Without a file, watch them on the Kubernetes API when serving an InferencePool.
    watch_api_objects: bool = True

    @property
    def kubernetes_discovery(self) -> bool:
        return bool(self.pool_name or self.endpoint_selector)

    @property
    def pool_label(self) -> str:
        """The ``name`` label of the pool metrics."""
        return self.pool_name or self.endpoint_selector or ""


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
        target, scrape_interval_s = scrape_settings(
            config.plugins, settings.refresh_metrics_interval_s
        )
        if scrape_interval_s >= settings.metrics_staleness_threshold_s:
            raise ConfigError(
                f"metrics-data-source interval {scrape_interval_s:g}s is not below "
                f"--metrics-staleness-threshold {settings.metrics_staleness_threshold_s:g}s: "
                "every endpoint's metrics would be stale between scrapes"
            )
        self.scraper = MetricsScraper(
            self.datastore,
            interval_s=scrape_interval_s,
            timeout_s=timeout,
            max_scrapes_per_second=settings.max_scrapes_per_second,
            engines=settings.engine_metrics,
            target=target,
        )
        self._data_sources: list[DataSource] = config.plugins.of_kind(DataSource)
        self.discovery: Discovery | None = config.discovery
        self._started = False
        self._gauge_task: asyncio.Task[None] | None = None
        self._pool_task: asyncio.Task[None] | None = None
        self._scheduler = config.scheduler
        self._threshold = settings.metrics_staleness_threshold_s
        # Staleness is logged on each move between fresh and stale, not on every tick.
        self._known_since: dict[str, float] = {}
        self._stale: set[str] = set()
        for plugin in config.plugins:
            self._instrument(plugin)
            plugin.register_metrics(metrics.registry)
        for profile in config.scheduler.profiles.values():
            self._instrument(profile.picker)
        self._instrument(config.scheduler.handler)
        self.datastore.add_listener(self._on_endpoints_changed)
        self.requests = build_request_manager(
            settings, config.flow_control, self.datastore.snapshot, metrics.registry
        )

    def _instrument(self, plugin: Plugin) -> None:
        point = next((name for kind, name in _EXTENSION_POINTS if isinstance(plugin, kind)), "")
        plugin.observe = self.metrics.observe_plugin(
            point or "Other", plugin.type_name, plugin.name
        )

    def _on_endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        now = self.datastore.clock()
        for ep in removed:
            self._known_since.pop(ep.key, None)
            self._stale.discard(ep.key)
        for ep in added:
            self._known_since[ep.key] = now
        for plugin in self.config.plugins:
            plugin.endpoints_changed(added, removed)
        self.requests.endpoints_changed()
        self._set_ready_gauge()
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
        for source in self._data_sources:
            await source.start(self.datastore, self.settings.refresh_metrics_interval_s)
        if self.discovery is None:
            self.discovery = await self._kubernetes_discovery()
        await self.discovery.start(self.datastore)
        await self.requests.start()
        self._gauge_task = asyncio.create_task(self._update_ready_gauge(), name="ready gauge")
        self._pool_task = asyncio.create_task(self._update_pool_gauges(), name="pool gauges")
        log.info(
            "director started: %d endpoints, profiles %s",
            len(self.datastore),
            ", ".join(self._scheduler.profiles),
        )

    async def _kubernetes_discovery(self) -> Discovery:
        from epp.discovery.kubernetes import InferencePoolDiscovery, PodSelectorDiscovery

        s = self.settings
        if s.endpoint_selector:
            return PodSelectorDiscovery(
                selector=s.endpoint_selector,
                ports=s.endpoint_target_ports,
                namespace=s.pool_namespace,
                api_server=s.kube_api_server,
                kubeconfig=s.kubeconfig,
            )
        if not s.pool_name:
            raise ConfigError(
                "no endpoint discovery: set --pool-name, --endpoint-selector or a discovery plugin"
            )
        return InferencePoolDiscovery(
            pool_name=s.pool_name,
            namespace=s.pool_namespace,
            pool_group=s.pool_group,
            api_server=s.kube_api_server,
            kubeconfig=s.kubeconfig,
        )

    def synced(self) -> bool:
        """Started, and the discovery source has delivered its first listing (maybe empty)."""
        if not self._started or self.discovery is None:
            return False
        event = getattr(self.discovery, "synced", None)
        return not isinstance(event, asyncio.Event) or event.is_set()

    def _set_ready_gauge(self) -> None:
        label = self.settings.pool_label
        fresh = self.datastore.count_fresh(self._threshold)
        self.metrics.ready_endpoints.labels(label).set(fresh)
        self.metrics.legacy_ready_pods.labels(label).set(fresh)

    async def _update_ready_gauge(self) -> None:
        # Freshness changes without membership changes, so the gauge is refreshed on a timer.
        period = max(self.settings.refresh_metrics_interval_s, 0.5)
        while True:
            self._set_ready_gauge()
            self._report_staleness(self.datastore.clock())
            await asyncio.sleep(period)

    async def _update_pool_gauges(self) -> None:
        while True:
            self.metrics.record_pool(
                self.settings.pool_label,
                self.datastore.snapshot(),
                self.datastore.count_fresh(self._threshold),
            )
            await asyncio.sleep(self.settings.pool_metrics_interval_s)

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
        tasks = [t for t in (self._gauge_task, self._pool_task) if t is not None]
        self._gauge_task = self._pool_task = None
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.requests.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        await self.scraper.stop()
        for plugin in self.config.plugins:
            await plugin.aclose()

    @property
    def queue_wait_bound_s(self) -> float:
        """How long a request may wait in flow control before scheduling (inf: no bound)."""
        return self.requests.queue_wait_bound_s

    def is_ready(self) -> bool:
        return self._started and len(self.datastore) > 0

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
        *,
        headers_only: bool = False,
    ) -> Decision:
        t0 = perf_counter()
        received = time.monotonic()
        request = self.config.parsers.parse(path, headers, body, headers_only=headers_only)
        model = request.model
        target = self.requests.rewrite(model)
        sent_body: bytes | None = None
        try:
            if target is not None and target != model and not headers_only:
                sent_body = rewrite_body(body, target)
                request = self.config.parsers.parse(path, headers, sent_body)
                request.requested_model = model
            # Flow control: the request may wait here (or be refused) before scheduling.
            admission = await self.requests.admit(
                headers,
                model=model,
                target_model=request.model,
                byte_size=len(body),
                tokens=request.token_estimate,
                request_id=request.request_id,
                received=received,
            )
            try:
                decision = await self._schedule(request, subset, t0, admission.priority)
            except BaseException:
                admission.abandon()
                raise
            admission.place(decision)
            decision.body = sent_body
            decision.target_model = request.model
            decision.model = model  # the model the client asked for
            return decision
        except SchedulingError as err:
            err.model = request.model
            self.metrics.record_attempt(request.model, None)
            raise

    def _admit_after_producers(
        self, priority: int, cycle: CycleState, endpoints: Sequence[Endpoint]
    ) -> None:
        """The admitters llm-d runs once the data producers ran on the candidates."""
        for admitter in self.config.flow_control.admitters:
            if not admitter.after_producers:
                continue
            reason = admitter.admit_request(priority, cycle, endpoints)
            if reason is not None:
                raise AdmissionDenied(f"request cannot be admitted: {reason}")

    async def _schedule(
        self, request: ParsedRequest, subset: Sequence[str] | None, t0: float, priority: int = 0
    ) -> Decision:
        endpoints: Sequence[Endpoint] = self.datastore.snapshot()
        if not endpoints:
            raise NoEndpoints("no endpoints known")
        destinations = (
            None
            if subset is None or self.settings.disable_subset_filter
            else subset_endpoints(endpoints, subset)
        )
        if destinations is not None and not destinations:
            raise NoEndpoints(
                f"none of the {len(subset or ())} endpoints in the gateway's subset hint "
                "is a known endpoint"
            )
        cycle = CycleState(request, time.monotonic(), self._threshold)
        try:
            await self._scheduler.produce(cycle, endpoints)
            self._admit_after_producers(priority, cycle, destinations or endpoints)
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
        primary = result.results.get(result.primary)
        port = result.destination_port
        # Several ranks of one pod share its primary port: one destination each.
        addresses = list(
            dict.fromkeys(
                ep.key if port is None else format_host_port(ep.address, port) for ep in decode
            )
        )
        decision = Decision(
            decode=addresses[0],
            prefill=prefill[0].key if prefill else None,
            encoders=encoders,
            decision_type=decision_type,
            decode_fallbacks=addresses[1:],
            release_prefill=tracking.release_stages,
            release_all=tracking.release_all,
            release_first_token=tracking.first_token,
            reassign=lambda served: self._reassign(tracking, request.request_id, served),
            model=request.model,
            headers={**_request_headers(cycle), **tracing.inject_current()},
            scores=(
                {s.endpoint.key: s.score for s in primary.scored}
                if self.settings.emit_endpoint_scores and primary is not None
                else {}
            ),
            response_headers=_response_headers(cycle),
        )
        scheduler = self._scheduler
        if scheduler.responders:
            decision.response_header_hook = lambda lb: scheduler.response_headers(cycle, lb)
        if scheduler.body_processors:
            decision.response_body_hook = lambda end: scheduler.response_body(cycle, end)
        handler = self._scheduler.handler
        self.metrics.record_disagg(handler.name, handler.type_name, request.model, decision_type)
        self.metrics.record_attempt(request.model, decode[0])
        self.metrics.record_scheduler_e2e(perf_counter() - t0)
        return decision


def subset_endpoints(endpoints: Sequence[Endpoint], subset: Sequence[str]) -> list[Endpoint]:
    """The endpoints the gateway's subset hint allows, matched by host: the hint's ports
    are ignored, as llm-d does (a pod's ports are all one engine's)."""
    hosts = {address_host(entry) for entry in subset}
    return [ep for ep in endpoints if ep.host in hosts]


def _request_headers(cycle: CycleState) -> dict[str, str]:
    added = cycle.get(REQUEST_HEADERS)
    return dict(added) if added is not None else {}


def _response_headers(cycle: CycleState) -> dict[str, str]:
    added = cycle.get(RESPONSE_HEADERS)
    return dict(added) if added is not None else {}


async def build_director(settings: DirectorSettings, metrics: EppMetrics) -> Director:
    """Load and validate the configuration; raises ``ConfigError`` naming the problem."""
    config = await asyncio.to_thread(
        load_config,
        settings.config_text,
        settings.config_file,
        pool_configured=settings.kubernetes_discovery,
    )
    if config.discovery is None and not settings.kubernetes_discovery:
        raise ConfigError(
            "no endpoint discovery: set --pool-name or --endpoint-selector, or configure a "
            "'file-discovery' plugin"
        )
    return Director(settings, config, metrics)
