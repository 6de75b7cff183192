"""Prometheus metrics of the EPP, named and labelled as llm-d's ``docs/metrics.md``.

The canonical families are ``llm_d_epp_*``. As llm-d does, each family that had an
older name is also written under it (``inference_objective_*``, ``inference_pool_*``,
``inference_extension_*``, ``llm_d_inference_scheduler_*``), so dashboards built on
either keep working. Families llm-d does not have carry this project's own prefix,
``disagg_epp_*``.

Client-derived label values are bounded as llm-d bounds them: ``model_name`` and
``target_model_name`` share 1000 distinct values, ``fairness_id`` has 1000; past that a
new value is reported as ``other``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Self

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.process_metrics import register_asyncio_tasks

if TYPE_CHECKING:
    from epp.datastore import Endpoint

__all__ = [
    "ERROR_CODES",
    "EppMetrics",
    "LabelBound",
    "error_code",
]

_P = "llm_d_epp_"
_OBJECTIVE = "inference_objective_"
_POOL = "inference_pool_"
_EXTENSION = "inference_extension_"
_SCHEDULER = "llm_d_inference_scheduler_"

# llm-d's buckets, family by family.
GENERAL_LATENCY = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15,
    20, 30, 45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600,
)  # fmt: skip
REQUEST_SIZE = tuple(float(2**i) for i in range(6, 31))  # 64 B .. 1 GiB
RESPONSE_SIZE = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536)
INPUT_TOKENS = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072,
    262144, 524288, 1048576,
)  # fmt: skip
OUTPUT_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
NTPOT = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
TTFT = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15,
    20, 30, 45, 60, 120,
)  # fmt: skip
TPOT = (
    0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4,
    0.5, 0.6, 0.8, 1, 2,
)  # fmt: skip
ITL = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2)
SCHEDULER = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
REQUEST_PROCESSING = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.04, 0.06, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
RESPONSE_PROCESSING = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
    2.5, 5,
)  # fmt: skip
STREAM_DURATION = (0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

REQUEST_LABELS = ("model_name", "target_model_name", "fairness_id", "priority")
MODEL_LABELS = ("model_name", "target_model_name")

# llm-d's error codes (the ``error_code`` label), by the HTTP status of the refusal.
ERROR_CODES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    412: "PreconditionFailed",
    413: "BadRequest",
    429: "ResourceExhausted",
    500: "Internal",
    503: "ServiceUnavailable",
}
MODEL_SERVER_ERROR = "ModelServerError"
_LABEL_CAP = 1000


def error_code(status: int) -> str:
    """llm-d's ``error_code`` for an EPP refusal with HTTP ``status``."""
    return ERROR_CODES.get(status, "Unknown")


class LabelBound:
    """Keeps at most ``cap`` distinct values of a client-chosen label; then ``other``."""

    def __init__(self, cap: int = _LABEL_CAP) -> None:
        self.cap = cap
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.cap:
            return "other"
        self._seen.add(value)
        return value


class PerRegistry:
    """Metric families declared once per registry: ``of(registry)`` builds them the
    first time and hands the same set to every plugin on that registry after."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._by_registry = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry) -> None:
        pass

    @classmethod
    def of(cls, registry: CollectorRegistry) -> Self:
        found = cls._by_registry.get(registry)
        if found is None:
            found = cls._by_registry[registry] = cls(registry)
        return found


def _build_ref() -> str:
    try:
        return version("disagg")
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        return "unknown"


class EppMetrics:
    """All EPP metric families, bound to one registry (one per process, or per test).

    ``stream_metrics`` adds the ext_proc stream families (``--enable-grpc-stream-metrics``).
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, stream_metrics: bool = False
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        register_asyncio_tasks(r)
        self.models = LabelBound()
        self.fairness_ids = LabelBound()

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(name, doc, list(labels), registry=r)

        def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
            return Gauge(name, doc, list(labels), registry=r)

        def histogram(
            name: str, doc: str, buckets: Iterable[float], labels: Iterable[str] = ()
        ) -> Histogram:
            return Histogram(name, doc, list(labels), buckets=tuple(buckets), registry=r)

        # -- request and latency ----------------------------------------------------------
        self.request_total = counter(
            _P + "request", "Total number of processed requests.", REQUEST_LABELS
        )
        self.request_errors = counter(
            _P + "request_error", "Total number of request errors.", (*REQUEST_LABELS, "error_code")
        )
        self.request_duration = histogram(
            _P + "request_duration_seconds",
            "End-to-end request latency in seconds.",
            GENERAL_LATENCY,
            REQUEST_LABELS,
        )
        self.request_size = histogram(
            _P + "request_size_bytes",
            "Incoming request body size in bytes.",
            REQUEST_SIZE,
            REQUEST_LABELS,
        )
        self.response_size = histogram(
            _P + "response_size_bytes",
            "Outgoing response body size in bytes.",
            RESPONSE_SIZE,
            REQUEST_LABELS,
        )
        self.input_tokens = histogram(
            _P + "request_input_tokens",
            "Input token count per request.",
            INPUT_TOKENS,
            REQUEST_LABELS,
        )
        self.output_tokens = histogram(
            _P + "request_output_tokens",
            "Output token count per request.",
            OUTPUT_TOKENS,
            REQUEST_LABELS,
        )
        self.cached_tokens = histogram(
            _P + "request_cached_tokens",
            "Prompt tokens read from cache per request, as the model server reports.",
            INPUT_TOKENS,
            REQUEST_LABELS,
        )
        self.running = gauge(
            _P + "request_running", "Requests currently in flight.", REQUEST_LABELS
        )
        self.ntpot = histogram(
            _P + "request_ntpot_seconds",
            "Normalized time per output token (end-to-end latency / output tokens).",
            NTPOT,
            REQUEST_LABELS,
        )
        self.ttft = histogram(
            _P + "request_ttft_seconds",
            "Time to first token: request received to first response byte (non-streaming: "
            "the whole response).",
            TTFT,
            (*REQUEST_LABELS, "streaming"),
        )
        self.tpot = histogram(
            _P + "request_streaming_tpot_seconds",
            "Average time per output token of a streaming response: (e2e - TTFT) / "
            "(output tokens - 1).",
            TPOT,
            REQUEST_LABELS,
        )
        self.itl = histogram(
            _P + "request_streaming_itl_seconds",
            "Time between consecutive response body chunks of a streaming response.",
            ITL,
            REQUEST_LABELS,
        )
        # llm-d's older names for the same series.
        self.legacy_request_total = counter(
            _OBJECTIVE + "request",
            "[Deprecated: llm_d_epp_request_total]",
            (*MODEL_LABELS, "priority"),
        )
        self.legacy_request_errors = counter(
            _OBJECTIVE + "request_error",
            "[Deprecated: llm_d_epp_request_error_total]",
            (*MODEL_LABELS, "error_code"),
        )
        self.legacy_request_duration = histogram(
            _OBJECTIVE + "request_duration_seconds",
            "[Deprecated: llm_d_epp_request_duration_seconds]",
            GENERAL_LATENCY,
            MODEL_LABELS,
        )
        self.legacy_request_size = histogram(
            _OBJECTIVE + "request_sizes",
            "[Deprecated: llm_d_epp_request_size_bytes]",
            REQUEST_SIZE,
            MODEL_LABELS,
        )
        self.legacy_response_size = histogram(
            _OBJECTIVE + "response_sizes",
            "[Deprecated: llm_d_epp_response_size_bytes]",
            RESPONSE_SIZE,
            MODEL_LABELS,
        )
        self.legacy_input_tokens = histogram(
            _OBJECTIVE + "input_tokens",
            "[Deprecated: llm_d_epp_request_input_tokens]",
            INPUT_TOKENS,
            MODEL_LABELS,
        )
        self.legacy_output_tokens = histogram(
            _OBJECTIVE + "output_tokens",
            "[Deprecated: llm_d_epp_request_output_tokens]",
            OUTPUT_TOKENS,
            MODEL_LABELS,
        )
        self.legacy_cached_tokens = histogram(
            _OBJECTIVE + "prompt_cached_tokens",
            "[Deprecated: llm_d_epp_request_cached_tokens]",
            INPUT_TOKENS,
            MODEL_LABELS,
        )
        self.legacy_running = gauge(
            _OBJECTIVE + "running_requests",
            "[Deprecated: llm_d_epp_request_running]",
            ("model_name",),
        )
        self.legacy_ntpot = histogram(
            _OBJECTIVE + "normalized_time_per_output_token_seconds",
            "[Deprecated: llm_d_epp_request_ntpot_seconds]",
            NTPOT,
            MODEL_LABELS,
        )

        # -- inference pool ---------------------------------------------------------------
        pool = ("name",)
        self.pool_avg_kv = gauge(
            _P + "average_kv_cache_utilization", "Mean KV-cache utilization across the pool.", pool
        )
        self.pool_avg_queue = gauge(_P + "average_queue_size", "Mean queue depth.", pool)
        self.pool_avg_running = gauge(
            _P + "average_running_requests", "Mean in-flight requests per endpoint.", pool
        )
        self.pool_std_kv = gauge(
            _P + "std_dev_kv_cache_utilization", "Spread of KV-cache utilization.", pool
        )
        self.pool_std_queue = gauge(_P + "std_dev_queue_size", "Spread of queue depth.", pool)
        self.pool_std_running = gauge(
            _P + "std_dev_running_requests", "Spread of in-flight requests.", pool
        )
        self.ready_endpoints = gauge(
            _P + "ready_endpoints", "Endpoints in the pool whose metrics are fresh.", pool
        )
        self.per_endpoint_queue = gauge(
            _P + "per_endpoint_queue_size",
            "Queue depth of each endpoint.",
            ("name", "model_server_endpoint"),
        )
        self.legacy_pool_avg_kv = gauge(
            _POOL + "average_kv_cache_utilization",
            "[Deprecated: llm_d_epp_average_kv_cache_utilization]",
            pool,
        )
        self.legacy_pool_avg_queue = gauge(
            _POOL + "average_queue_size", "[Deprecated: llm_d_epp_average_queue_size]", pool
        )
        self.legacy_pool_avg_running = gauge(
            _POOL + "average_running_requests",
            "[Deprecated: llm_d_epp_average_running_requests]",
            pool,
        )
        self.legacy_ready_pods = gauge(
            _POOL + "ready_pods", "[Deprecated: llm_d_epp_ready_endpoints]", pool
        )
        self.legacy_per_pod_queue = gauge(
            _POOL + "per_pod_queue_size",
            "[Deprecated: llm_d_epp_per_endpoint_queue_size]",
            ("name", "model_server_pod"),
        )

        # -- scheduler, processing overhead, plugins --------------------------------------
        self.scheduler_e2e = histogram(
            _P + "scheduler_e2e_duration_seconds",
            "End-to-end scheduling latency in seconds.",
            SCHEDULER,
        )
        self.scheduler_attempts = counter(
            _P + "scheduler_attempts",
            "Scheduling attempts.",
            ("status", "target_model_name", "endpoint_name", "namespace", "port"),
        )
        self.request_processing = histogram(
            _P + "request_processing_duration_seconds",
            "Time from request receipt until the request body has been handled.",
            REQUEST_PROCESSING,
        )
        self.response_processing = histogram(
            _P + "response_processing_duration_seconds",
            "EPP time spent on the response (sum over its chunks).",
            RESPONSE_PROCESSING,
        )
        self.plugin_duration = histogram(
            _P + "plugin_duration_seconds",
            "Plugin execution time in seconds.",
            SCHEDULER,
            ("extension_point", "plugin_type", "plugin_name"),
        )
        self.info = gauge(_P + "info", "Build information.", ("commit", "build_ref"))
        self.legacy_scheduler_e2e = histogram(
            _EXTENSION + "scheduler_e2e_duration_seconds",
            "[Deprecated: llm_d_epp_scheduler_e2e_duration_seconds]",
            SCHEDULER,
        )
        self.legacy_scheduler_attempts = counter(
            _EXTENSION + "scheduler_attempts",
            "[Deprecated: llm_d_epp_scheduler_attempts_total]",
            ("status", "target_model_name", "pod_name", "namespace", "port"),
        )
        self.legacy_plugin_duration = histogram(
            _EXTENSION + "plugin_duration_seconds",
            "[Deprecated: llm_d_epp_plugin_duration_seconds]",
            SCHEDULER,
            ("extension_point", "plugin_type", "plugin_name"),
        )
        self.legacy_info = gauge(_EXTENSION + "info", "Build information.", ("commit", "build_ref"))
        build = _build_ref()
        self.info.labels(commit="unknown", build_ref=build).set(1)
        self.legacy_info.labels(commit="unknown", build_ref=build).set(1)

        # -- disaggregation ---------------------------------------------------------------
        disagg = ("plugin_name", "plugin_type", "model_name", "decision_type")
        self.disagg_decisions = counter(
            _P + "disagg_decision", "Requests by disaggregation decision.", disagg
        )
        self.legacy_disagg_decisions = counter(
            _SCHEDULER + "disagg_decision", "[Deprecated: llm_d_epp_disagg_decision_total]", disagg
        )

        # -- ext_proc streams (--enable-grpc-stream-metrics) ------------------------------
        self.stream_metrics = stream_metrics
        if stream_metrics:
            self.streams_inflight: Gauge | None = gauge(
                _P + "extproc_streams_inflight", "ext_proc gRPC streams open now."
            )
            self.stream_duration: Histogram | None = histogram(
                _P + "extproc_stream_duration_seconds",
                "How long an ext_proc gRPC stream stayed open.",
                STREAM_DURATION,
            )
            self.streams_total: Counter | None = counter(
                _P + "extproc_streams",
                "ext_proc gRPC streams completed, by status code.",
                ("code",),
            )
        else:
            self.streams_inflight = self.stream_duration = self.streams_total = None

        # -- this project's own -----------------------------------------------------------
        self.endpoints = gauge(
            "disagg_epp_endpoints", "Endpoints currently known, by role.", ("role",)
        )
        self.streams_ended_early = counter(
            "disagg_epp_extproc_streams_ended_early",
            "ext_proc streams the gateway closed or reset before the response ended, by stage "
            "(before_routing, after_routing).",
            ("stage",),
        )

    # -- recording helpers ----------------------------------------------------------------

    def bound(self, model: str, fairness_id: str) -> tuple[str, str]:
        return self.models(model), self.fairness_ids(fairness_id)

    def observe_plugin(self, extension_point: str, plugin_type: str, plugin_name: str) -> Any:
        """One callable observing both the current and the legacy plugin histogram."""
        now = self.plugin_duration.labels(extension_point, plugin_type, plugin_name).observe
        old = self.legacy_plugin_duration.labels(extension_point, plugin_type, plugin_name).observe

        def observe(seconds: float) -> None:
            now(seconds)
            old(seconds)

        return observe

    def record_scheduler_e2e(self, seconds: float) -> None:
        self.scheduler_e2e.observe(seconds)
        self.legacy_scheduler_e2e.observe(seconds)

    def record_attempt(self, target_model: str, endpoint: Endpoint | None) -> None:
        if endpoint is None:
            labels = ("failure", target_model, "", "", "")
        else:
            labels = ("success", target_model, endpoint.name, endpoint.namespace,
                      str(endpoint.port))  # fmt: skip
        self.scheduler_attempts.labels(*labels).inc()
        self.legacy_scheduler_attempts.labels(*labels).inc()

    def record_disagg(self, plugin_name: str, plugin_type: str, model: str, kind: str) -> None:
        model = self.models(model) or "unknown"
        self.disagg_decisions.labels(plugin_name, plugin_type, model, kind).inc()
        self.legacy_disagg_decisions.labels(plugin_name, plugin_type, model, kind).inc()

    def record_pool(self, pool: str, endpoints: Iterable[Endpoint], fresh: int) -> None:
        """The pool gauges from the endpoints' last scraped metrics."""
        eps = list(endpoints)
        self.ready_endpoints.labels(pool).set(fresh)
        self.legacy_ready_pods.labels(pool).set(fresh)
        self.per_endpoint_queue.clear()
        self.legacy_per_pod_queue.clear()
        if not eps:
            return
        kv = [ep.metrics.kv_usage for ep in eps]
        queue = [float(ep.metrics.waiting) for ep in eps]
        running = [float(ep.metrics.running) for ep in eps]
        for values, avg, std, legacy in (
            (kv, self.pool_avg_kv, self.pool_std_kv, self.legacy_pool_avg_kv),
            (queue, self.pool_avg_queue, self.pool_std_queue, self.legacy_pool_avg_queue),
            (running, self.pool_avg_running, self.pool_std_running, self.legacy_pool_avg_running),
        ):
            mean = sum(values) / len(values)
            spread = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            avg.labels(pool).set(mean)
            legacy.labels(pool).set(mean)
            std.labels(pool).set(spread)
        for ep, waiting in zip(eps, queue, strict=True):
            self.per_endpoint_queue.labels(pool, ep.name).set(waiting)
            self.legacy_per_pod_queue.labels(pool, ep.name).set(waiting)
