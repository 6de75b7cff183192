"""Metric families of ``predicted-latency-producer``, named, labelled and bucketed as
llm-d's producer writes them.

Per producer (labels ``plugin_name``, ``plugin_type``, ``model_name``,
``target_model_name``), each with its deprecated ``inference_objective_*`` twin (the
same without the plugin labels):

- ``llm_d_epp_request_predicted_ttft_seconds`` / ``..._predicted_tpot_seconds``: the
  prediction for the endpoint the request went to (for TTFT the prefill endpoint when
  the request was disaggregated), observed when the response ends;
- ``llm_d_epp_request_ttft_prediction_duration_seconds`` / ``..._tpot_...``: how long
  the bulk prediction call took (one call predicts both);
- ``llm_d_epp_request_slo_violation_total`` (label ``type``: ``ttft``, ``tpot``): a
  response whose TTFT (or mean TPOT) exceeded the request's SLO header;
- ``llm_d_epp_inference_request_metric`` (label ``type``): a gauge holding the last value
  of each of the above (``ttft``, ``predicted_ttft``, ``ttft_prediction_duration``,
  ``ttft_slo_violation`` as 0 or 1, and the same for ``tpot``).

The actual TTFT and TPOT are ``llm_d_epp_request_ttft_seconds`` and
``llm_d_epp_request_streaming_tpot_seconds`` of every request (``epp.metrics``); the
producer adds their deprecated twins from its own measurement, as llm-d's does:
``inference_objective_request_ttft_seconds`` and ``inference_objective_request_tpot_seconds``.

This project's own counters of the predictor client, by producer and outcome:
``disagg_epp_latency_predictions_total`` (prediction calls: success, error),
``disagg_epp_latency_prediction_requests_total`` (the HTTP requests they took, fewer
when coalesced) and ``disagg_epp_latency_training_samples_total`` (sent, dropped).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

from epp.metrics import GENERAL_LATENCY, LabelBound, PerRegistry
from epp.plugins.latency_predictor_client import LatencyPredictorClient

__all__ = ["PREDICTION_DURATION", "PREDICTOR_TPOT", "PredictedLatencyMetrics", "slo_violated"]

_P = "llm_d_epp_"
_OBJECTIVE = "inference_objective_"

# llm-d's buckets for this producer's families.
PREDICTOR_TPOT = (
    0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4,
    0.5, 0.6, 0.8, 1, 1.5, 2, 3, 4.5, 6, 12, 18, 24, 30, 36, 48, 60, 90, 120, 180, 270, 360,
)  # fmt: skip
PREDICTION_DURATION = (
    0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip

_MODEL = ("model_name", "target_model_name")
_PLUGIN = ("plugin_name", "plugin_type", *_MODEL)


def slo_violated(actual_ms: float, slo_ms: float) -> bool | None:
    """Whether a latency broke its SLO; None when the request set none (SLO <= 0)."""
    if slo_ms <= 0:
        return None
    return actual_ms > slo_ms


class PredictedLatencyMetrics(PerRegistry):
    """The families, one set per registry, shared by every producer on it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.models = LabelBound()
        self._clients = _ClientCounters()
        r.register(self._clients)

        def pair(name: str, doc: str, buckets: tuple[float, ...]) -> tuple[Histogram, Histogram]:
            return (
                Histogram(_P + name, doc, _PLUGIN, buckets=buckets, registry=r),
                Histogram(
                    _OBJECTIVE + name,
                    f"[Deprecated: Use {_P}{name}] {doc}",
                    _MODEL,
                    buckets=buckets,
                    registry=r,
                ),
            )

        self.predicted_ttft, self.legacy_predicted_ttft = pair(
            "request_predicted_ttft_seconds",
            "Predicted time to first token of the endpoint each request went to, in seconds.",
            GENERAL_LATENCY,
        )
        self.ttft_prediction_duration, self.legacy_ttft_prediction_duration = pair(
            "request_ttft_prediction_duration_seconds",
            "Time taken by the TTFT predictions of a request, in seconds.",
            PREDICTION_DURATION,
        )
        self.predicted_tpot, self.legacy_predicted_tpot = pair(
            "request_predicted_tpot_seconds",
            "Predicted time per output token of the endpoint each request went to, in seconds.",
            PREDICTOR_TPOT,
        )
        self.tpot_prediction_duration, self.legacy_tpot_prediction_duration = pair(
            "request_tpot_prediction_duration_seconds",
            "Time taken by the TPOT predictions of a request, in seconds.",
            PREDICTION_DURATION,
        )
        self.slo_violations = Counter(
            _P + "request_slo_violation",
            "Responses whose latency exceeded the request's SLO, by type (ttft, tpot).",
            (*_PLUGIN, "type"),
            registry=r,
        )
        self.legacy_slo_violations = Counter(
            _OBJECTIVE + "request_slo_violation",
            f"[Deprecated: Use {_P}request_slo_violation_total] Responses whose latency "
            "exceeded the request's SLO, by type (ttft, tpot).",
            (*_MODEL, "type"),
            registry=r,
        )
        self.gauge = Gauge(
            _P + "inference_request_metric",
            "Last value of each predicted-latency measure, by type (ttft, predicted_ttft, "
            "ttft_prediction_duration, ttft_slo_violation, and the same for tpot).",
            (*_PLUGIN, "type"),
            registry=r,
        )
        self.legacy_gauge = Gauge(
            _OBJECTIVE + "inference_request_metric",
            f"[Deprecated: Use {_P}inference_request_metric] Last value of each "
            "predicted-latency measure, by type.",
            (*_MODEL, "type"),
            registry=r,
        )
        self.legacy_ttft = Histogram(
            _OBJECTIVE + "request_ttft_seconds",
            f"[Deprecated: Use {_P}request_ttft_seconds] Time to first token in seconds "
            "(without streaming: the whole response).",
            _MODEL,
            buckets=GENERAL_LATENCY,
            registry=r,
        )
        self.legacy_tpot = Histogram(
            _OBJECTIVE + "request_tpot_seconds",
            f"[Deprecated: Use {_P}request_streaming_tpot_seconds] Mean time per output "
            "token of a streamed response, in seconds.",
            _MODEL,
            buckets=PREDICTOR_TPOT,
            registry=r,
        )

    def add_client(self, producer: str, client: LatencyPredictorClient) -> None:
        """Export ``client``'s counters under the producer's name."""
        self._clients.clients.append((producer, client))

    def _set(self, plugin: tuple[str, str], model: tuple[str, str], kind: str, v: float) -> None:
        self.gauge.labels(*plugin, *model, kind).set(v)
        self.legacy_gauge.labels(*model, kind).set(v)

    def _model(self, model: str, target_model: str) -> tuple[str, str]:
        return self.models(model), self.models(target_model)

    def record_prediction_duration(
        self, plugin: tuple[str, str], model: str, target_model: str, seconds: float
    ) -> None:
        """One bulk prediction call (both TTFT and TPOT) took ``seconds``."""
        m = self._model(model, target_model)
        for now, old, kind in (
            (self.ttft_prediction_duration, self.legacy_ttft_prediction_duration, "ttft"),
            (self.tpot_prediction_duration, self.legacy_tpot_prediction_duration, "tpot"),
        ):
            now.labels(*plugin, *m).observe(seconds)
            old.labels(*m).observe(seconds)
            self._set(plugin, m, f"{kind}_prediction_duration", seconds)

    def record_latency(
        self,
        kind: str,
        plugin: tuple[str, str],
        model: str,
        target_model: str,
        *,
        actual_ms: float,
        predicted_ms: float | None,
        slo_ms: float,
    ) -> None:
        """A finished response's ``kind`` (``ttft`` or ``tpot``): the actual value, the
        prediction it was routed on (None: there was none) and its SLO check."""
        m = self._model(model, target_model)
        actual_s = actual_ms / 1000.0
        (self.legacy_ttft if kind == "ttft" else self.legacy_tpot).labels(*m).observe(actual_s)
        self._set(plugin, m, kind, actual_s)
        if predicted_ms is not None and predicted_ms >= 0:
            hist, legacy = (
                (self.predicted_ttft, self.legacy_predicted_ttft)
                if kind == "ttft"
                else (self.predicted_tpot, self.legacy_predicted_tpot)
            )
            hist.labels(*plugin, *m).observe(predicted_ms / 1000.0)
            legacy.labels(*m).observe(predicted_ms / 1000.0)
            self._set(plugin, m, f"predicted_{kind}", predicted_ms / 1000.0)
        violated = slo_violated(actual_ms, slo_ms)
        if violated is None:
            return
        self._set(plugin, m, f"{kind}_slo_violation", 1.0 if violated else 0.0)
        if violated:
            self.slo_violations.labels(*plugin, *m, kind).inc()
            self.legacy_slo_violations.labels(*m, kind).inc()


class _ClientCounters:
    """The predictor clients' own counters, read at each scrape."""

    def __init__(self) -> None:
        self.clients: list[tuple[str, LatencyPredictorClient]] = []

    def collect(self) -> Iterator[Metric]:
        preds = CounterMetricFamily(
            "disagg_epp_latency_predictions",
            "Bulk prediction calls to the latency predictor, by outcome (success, error).",
            labels=["producer", "outcome"],
        )
        http = CounterMetricFamily(
            "disagg_epp_latency_prediction_requests",
            "HTTP requests to the prediction server, by outcome (success, error); "
            "concurrent calls coalesced into one request count once.",
            labels=["producer", "outcome"],
        )
        samples = CounterMetricFamily(
            "disagg_epp_latency_training_samples",
            "Training samples for the latency predictor: sent, or dropped (sampled "
            "away or not delivered).",
            labels=["producer", "outcome"],
        )
        for name, c in self.clients:
            preds.add_metric([name, "success"], c.predictions_ok)
            preds.add_metric([name, "error"], c.predictions_failed)
            http.add_metric([name, "success"], c.requests_ok)
            http.add_metric([name, "error"], c.requests_failed)
            samples.add_metric([name, "sent"], c.training_sent)
            samples.add_metric([name, "dropped"], c.training_dropped)
        yield preds
        yield http
        yield samples
