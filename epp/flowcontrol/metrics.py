"""The flow_control_* metric families, named and labelled as llm-d's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["FlowControlMetrics", "RewriteMetrics"]

_P = "llm_d_epp_"
_QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_CYCLE_BUCKETS = (0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05)
_QUEUE_LABELS = ("fairness_id", "priority", "inference_pool", "model_name", "target_model_name")


class FlowControlMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.requests = Counter(
            _P + "flow_control_requests",
            "Requests processed by flow control, by terminal outcome.",
            ("outcome", "priority", "inference_pool"),
            registry=r,
        )
        self.queue_duration = Histogram(
            _P + "flow_control_request_queue_duration_seconds",
            "Time a request spent in flow control, from enqueue to its outcome.",
            (
                "fairness_id",
                "priority",
                "outcome",
                "inference_pool",
                "model_name",
                "target_model_name",
            ),
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self.enqueue_duration = Histogram(
            _P + "flow_control_request_enqueue_duration_seconds",
            "Time taken to enqueue a request into flow control.",
            ("fairness_id", "priority", "outcome"),
            buckets=_CYCLE_BUCKETS,
            registry=r,
        )
        self.dispatch_cycle = Histogram(
            _P + "flow_control_dispatch_cycle_duration_seconds",
            "Time taken by one dispatch cycle.",
            buckets=_CYCLE_BUCKETS,
            registry=r,
        )
        self.queue_size = Gauge(
            _P + "flow_control_queue_size",
            "Requests held in the flow-control queues.",
            _QUEUE_LABELS,
            registry=r,
        )
        self.queue_bytes = Gauge(
            _P + "flow_control_queue_bytes",
            "Bytes of the requests held in the flow-control queues.",
            _QUEUE_LABELS,
            registry=r,
        )
        self.pool_saturation = Gauge(
            _P + "flow_control_pool_saturation",
            "Pool saturation gating dispatch, per stage (prefill, decode, effective).",
            ("inference_pool", "stage"),
            registry=r,
        )
        self.stale_endpoints = Gauge(
            _P + "flow_control_stale_endpoints",
            "Candidate endpoints with missing or stale metrics at the last evaluation.",
            ("detector",),
            registry=r,
        )
        self.capacity_requests = Gauge(
            _P + "flow_control_capacity_utilization_requests",
            "Fraction of a priority band's request capacity occupied.",
            ("priority", "inference_pool"),
            registry=r,
        )
        self.capacity_bytes = Gauge(
            _P + "flow_control_capacity_utilization_bytes",
            "Fraction of a priority band's byte capacity occupied.",
            ("priority", "inference_pool"),
            registry=r,
        )
        self.global_requests = Gauge(
            _P + "flow_control_global_capacity_utilization_requests",
            "Fraction of the global request capacity occupied (only when configured).",
            ("inference_pool",),
            registry=r,
        )
        self.global_bytes = Gauge(
            _P + "flow_control_global_capacity_utilization_bytes",
            "Fraction of the global byte capacity occupied (only when configured).",
            ("inference_pool",),
            registry=r,
        )
        self.revocations_issued = Counter(
            _P + "flow_control_revocations_issued",
            "In-flight evictions issued, by the waiting band's priority.",
            ("priority", "inference_pool"),
            registry=r,
        )
        self.revocations = Counter(
            _P + "flow_control_revocations",
            "In-flight evictions by terminal outcome (confirmed, timed_out).",
            ("outcome", "inference_pool"),
            registry=r,
        )


class RewriteMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.decisions = Counter(
            _P + "model_rewrite_decisions",
            "Model-rewrite decisions.",
            ("model_rewrite_name", "model_name", "target_model"),
            registry=registry,
        )
        self.unknown_objectives = Counter(
            _P + "inference_objective_unknown",
            "Requests naming an InferenceObjective this EPP does not know (default priority).",
            registry=registry,
        )
