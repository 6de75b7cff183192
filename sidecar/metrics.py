"""Prometheus metrics on their own registry, served on ``--metrics-port``.

The main port's ``/metrics`` belongs to vLLM and passes through untouched.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from common.loop_metrics import CounterChild, LoopCounter, LoopGauge, LoopHistogram
from common.process_metrics import register_asyncio_tasks
from sidecar.api_shapes import API_SHAPES

__all__ = ["Metrics", "path_label"]

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
_OVERHEAD_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)  # fmt: skip


def path_label(path: str) -> str:
    """Bounded label cardinality: the P/D API paths by name, everything else as 'other'."""
    return path if path in API_SHAPES else "other"


class Metrics:
    """All sidecar series. One instance per process (tests may create their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        register_asyncio_tasks(r)
        # The series every request updates are lock-free (``common.loop_metrics``).
        self.requests = LoopCounter(
            "pd_sidecar_requests",
            "Requests answered, by path, mode (pd, epd, local, fallback, passthrough), status.",
            ["path", "mode", "status"],
            r,
        )
        self.prefill_seconds = LoopHistogram(
            "pd_sidecar_prefill_seconds",
            "Prefill stage duration (all attempts), successful or not.",
            _LATENCY_BUCKETS,
            r,
        )
        self.decode_ttft_seconds = LoopHistogram(
            "pd_sidecar_decode_ttft_seconds",
            "From sending the decode leg to its first response byte.",
            _LATENCY_BUCKETS,
            r,
        )
        self.ttft_seconds = LoopHistogram(
            "pd_sidecar_ttft_seconds",
            "End to end: request received to first response byte sent to the client.",
            _LATENCY_BUCKETS,
            r,
        )
        self.total_seconds = LoopHistogram(
            "pd_sidecar_request_seconds",
            "Request received to response complete.",
            _LATENCY_BUCKETS,
            r,
        )
        self.overhead_seconds = LoopHistogram(
            "pd_sidecar_overhead_seconds",
            "Time to first byte not spent waiting on upstreams (the sidecar's own cost).",
            _OVERHEAD_BUCKETS,
            r,
        )
        self.prefill_retries = Counter(
            "pd_sidecar_prefill_retries",
            "Prefill attempts retried, by reason.",
            ["reason"],
            registry=r,
        )
        self.prefill_fallbacks = Counter(
            "pd_sidecar_prefill_fallbacks",
            "Requests decoded locally because the prefill failed (--prefill-fallback=local).",
            ["reason"],
            registry=r,
        )
        self.prefill_failures = Counter(
            "pd_sidecar_prefill_failures",
            "Prefill stages that failed, by reason (whatever the fallback policy).",
            ["reason"],
            registry=r,
        )
        self.prefill_finished = Counter(
            "pd_sidecar_prefill_finished",
            "Prefills whose generation ended on the first token (EOS or a stop string), "
            "leaving no KV: the decode ran the client's own body instead. Not a failure.",
            registry=r,
        )
        self.decode_chunks = Counter(
            "pd_sidecar_decode_chunks",
            "Decode chunks sent to the local engine (--decode-chunk-size).",
            registry=r,
        )
        # llm-d's MoRI-IO peer re-resolution counters, under llm-d's names.
        self.moriio_dns_reresolve = Counter(
            "moriio_dns_reresolve",
            "Successful request-path DNS re-resolutions of MoRI-IO peers.",
            registry=r,
        )
        self.moriio_dns_ip_changed = Counter(
            "moriio_dns_ip_changed",
            "Re-resolutions where a MoRI-IO peer had a different IP than the cached one.",
            registry=r,
        )
        self.moriio_dns_lookup_failures = Counter(
            "moriio_dns_lookup_failures",
            "Failed request-path DNS lookups of MoRI-IO peers (the last address is kept).",
            registry=r,
        )
        self.forbidden_fields = Counter(
            "pd_sidecar_forbidden_fields",
            "Requests refused (400) for a body field only the sidecar may set, by field.",
            ["field"],
            registry=r,
        )
        self.stale_connection_retries = Counter(
            "pd_sidecar_stale_connection_retries",
            "Upstream requests resent once because a pooled connection had been closed.",
            ["stage"],
            registry=r,
        )
        self.encode_seconds = Histogram(
            "pd_sidecar_encode_seconds",
            "Encode stage duration (all items, all attempts), successful or not.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.encode_items = Counter(
            "pd_sidecar_encode_items",
            "Distinct multimodal items sent to an encoder.",
            registry=r,
        )
        self.encode_failures = Counter(
            "pd_sidecar_encode_failures",
            "Encode stages that failed, by reason.",
            ["reason"],
            registry=r,
        )
        self.encode_retries = Counter(
            "pd_sidecar_encode_retries",
            "Encode requests retried on the next encoder, by reason.",
            ["reason"],
            registry=r,
        )
        self.ssrf_decisions = Counter(
            "pd_sidecar_ssrf_decisions",
            "SSRF target checks, by stage (prefill, encode, kv-source, data-parallel),"
            " decision and rule.",
            ["stage", "decision", "rule"],
            registry=r,
        )
        self.tls_reloads = Counter(
            "pd_sidecar_tls_reloads",
            "Serving certificate reloads from --cert-path, by outcome (ok, error).",
            ["outcome"],
            registry=r,
        )
        # Labelled children of the per-request counter, looked up once per label set.
        self._request_children: dict[tuple[str, str, int], CounterChild] = {}
        self.in_flight = LoopGauge(
            "pd_sidecar_in_flight_requests", "Requests being served right now.", r
        )

    def count_request(self, path: str, mode: str, status: int) -> None:
        """One answered request (the labelled child is cached: this runs per request)."""
        key = (path_label(path), mode, status)
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(path=key[0], mode=mode, status=str(status))
            self._request_children[key] = child
        child.inc()
