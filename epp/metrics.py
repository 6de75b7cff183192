"""Prometheus metrics of the EPP, named as the llm-d EPP names them where it has them."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["EppMetrics", "register_asyncio_tasks"]

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)


def _asyncio_tasks() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # scraped outside the serving loop (tests collecting directly)
        return 0.0


def register_asyncio_tasks(registry: CollectorRegistry) -> None:
    """``python_asyncio_tasks``: live tasks in the serving loop, the analogue of Go's
    ``go_goroutines``; a count that keeps growing under steady load is a leak."""
    Gauge(
        "python_asyncio_tasks", "Asyncio tasks alive in the serving event loop.", registry=registry
    ).set_function(_asyncio_tasks)


class EppMetrics:
    """All EPP metric families, bound to one registry (one per process, or per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        register_asyncio_tasks(r)
        self.disagg_decisions = Counter(
            "llm_d_epp_disagg_decision",
            "Disaggregation decisions by type.",
            ["decision_type"],
            registry=r,
        )
        self.scheduler_e2e_duration = Histogram(
            "llm_d_epp_scheduler_e2e_duration_seconds",
            "End-to-end scheduling latency of one request.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.plugin_duration = Histogram(
            "llm_d_epp_scheduler_plugin_duration_seconds",
            "Time spent in one plugin invocation.",
            ["plugin_type", "plugin_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "llm_d_epp_requests",
            "Requests seen by the EPP, by model.",
            ["model_name"],
            registry=r,
        )
        self.request_errors = Counter(
            "llm_d_epp_request_errors",
            "Requests the EPP refused, by status and reason.",
            ["status", "reason"],
            registry=r,
        )
        self.ready_endpoints = Gauge(
            "llm_d_epp_ready_endpoints",
            "Endpoints currently known and not stale.",
            registry=r,
        )
        self.extproc_streams = Gauge(
            "llm_d_epp_extproc_streams",
            "ext_proc streams open now (one per HTTP request passing the gateway).",
            registry=r,
        )
        self.extproc_streams_ended_early = Counter(
            "llm_d_epp_extproc_streams_ended_early",
            "ext_proc streams the gateway closed or reset before the response ended, by "
            "stage (before_routing, after_routing).",
            ["stage"],
            registry=r,
        )
        self.endpoints = Gauge(
            "llm_d_epp_endpoints",
            "Endpoints currently known, by role.",
            ["role"],
            registry=r,
        )
