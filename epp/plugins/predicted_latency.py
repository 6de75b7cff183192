"""predicted-latency-producer: per-endpoint TTFT/TPOT predictions from the external
latency predictor, and the training samples it learns from.

Before scheduling, one bulk call to the prediction server (``epp.plugins.
latency_predictor_client``) predicts, for every candidate endpoint, the request's TTFT
and TPOT in ms from the endpoint's features: KV cache usage, waiting requests, the
requests and uncached prompt tokens this EPP has in flight there
(``inflight-load-producer``; the engine's running count without it), the request's
prompt tokens and its prefix-cache match on the endpoint. Each prediction is checked
against the request's SLO headers (``x-llm-d-slo-ttft-ms``, ``x-llm-d-slo-tpot-ms``):

- TTFT is valid when predicted < SLO (no SLO header: never valid); headroom = SLO -
  predicted;
- with ``streamingMode`` TPOT is valid when predicted < SLO x ``sloBufferFactor``, the
  SLO lowered to the tightest TPOT SLO among the requests running on the endpoint;
  without it (TPOT is never trained then), and on prefill endpoints
  (``endpointRoleLabel`` = ``prefill``), TPOT is valid with headroom 0.

The result, with the count of requests this producer tracks on the endpoint, is the
request attribute ``LatencyPredictionInfoDataKey`` of this producer (see
``epp.datalayer.latency``), read by ``latency-slo-admitter`` and ``latency-scorer``.

When the predictor fails (down, slower than 1 s, a bad answer, or backing off after a
failure; see ``epp.plugins.latency_predictor_client``)
the request gets no predictions and goes on: the admitter then admits, the scorer
falls back to its composite score. Failures are counted
(``disagg_epp_latency_predictions_total{outcome="error"}``) and logged (at most one
warning per 30 s). ``predictInProduce: false`` only collects training samples.

Training (llm-d's): without ``streamingMode`` one sample per completed request, its
end-to-end latency (dispatch to the last response byte) as ``actual_ttft_ms``; with it,
the TTFT at the first response chunk and, at the end, the mean time per later chunk
as ``actual_tpot_ms``. Samples are buffered and sent once a second. A request that
does not complete (cancelled, failed stream) yields no sample.

Metrics (llm-d's, see ``epp.plugins.predicted_latency_metrics``): the prediction
call's duration, and when the response ends the prediction for the endpoint it went to,
the actual TTFT/TPOT and the SLO violations (``llm_d_epp_request_slo_violation_total``:
TTFT above ``x-llm-d-slo-ttft-ms``, or with ``streamingMode`` the mean TPOT above
``x-llm-d-slo-tpot-ms``). A request routed without a prediction has none observed.

``useEncoderCacheFeatures`` is not supported (refused at load).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from common.durations import PositiveSeconds
from epp.datalayer.latency import (
    TPOT_SLO_HEADERS,
    TTFT_SLO_HEADERS,
    LatencyPredictionInfo,
    put_predictions,
    slo_ms,
)
from epp.datastore import Endpoint
from epp.plugins.base import (
    DataProducer,
    PluginParams,
    PluginSet,
    Release,
    RequestTracker,
    ResponseBodyProcessor,
)
from epp.plugins.inflight_load import InFlightLoadProducer, bind_inflight_producer
from epp.plugins.latency_predictor_client import (
    LatencyPredictorClient,
    Prediction,
    PredictionRequest,
    PredictorConfig,
    PredictorError,
    TrainingEntry,
)
from epp.plugins.predicted_latency_metrics import PredictedLatencyMetrics
from epp.plugins.prefix_producer import (
    PrefixMatch,
    match_source,
)
from epp.plugins.registry import register
from epp.plugins.token_producer import tokenized_prompt
from epp.scheduling.cycle import CycleState, StateKey
from epp.scheduling.result import SchedulingResult

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["PredictedLatencyProducer", "validate_prediction"]

log = logging.getLogger(__name__)

_FAILURE_LOG_INTERVAL_S = 30.0
_PREFILL_ROLE = "prefill"


def validate_prediction(
    pred: Prediction,
    *,
    ttft_slo_ms: float,
    tpot_slo_ms: float,
    slo_buffer_factor: float,
    streaming: bool,
    endpoint_min_tpot_slo_ms: float,
    prefill_endpoint: bool,
    dispatched: int,
) -> LatencyPredictionInfo:
    """llm-d's validity and headroom of one endpoint's prediction (pure)."""
    ttft_valid = pred.ttft_ms < ttft_slo_ms
    ttft_headroom = ttft_slo_ms - pred.ttft_ms
    tpot_valid = True
    tpot_headroom = 0.0
    if streaming and not prefill_endpoint:
        buffered = tpot_slo_ms * slo_buffer_factor
        if endpoint_min_tpot_slo_ms > 0:
            buffered = min(buffered, endpoint_min_tpot_slo_ms * slo_buffer_factor)
        tpot_valid = pred.tpot_ms < buffered
        tpot_headroom = buffered - pred.tpot_ms
    return LatencyPredictionInfo(
        ttft_valid=ttft_valid,
        tpot_valid=tpot_valid,
        ttft_headroom=ttft_headroom,
        tpot_headroom=tpot_headroom,
        ttft=pred.ttft_ms,
        tpot=pred.tpot_ms,
        dispatched_request_count=dispatched,
    )


@dataclass(slots=True)
class _Request:
    """One request's latency bookkeeping, from prefetch to its last response chunk."""

    ttft_slo_ms: float
    tpot_slo_ms: float
    input_tokens: int
    prefix_scores: dict[str, float] = field(default_factory=dict)
    # endpoint key -> (prompt tokens in flight, requests in flight) when predicted
    inflight: dict[str, tuple[int, int]] = field(default_factory=dict)
    predictions: dict[str, LatencyPredictionInfo] = field(default_factory=dict)
    token: int = 0
    target: Endpoint | None = None
    prefill: Endpoint | None = None
    dispatched_at: float = 0.0
    ttft_ms: float = 0.0
    chunks: int = 0
    finished: bool = False
    model: str = ""
    target_model: str = ""


@dataclass(slots=True)
class _Running:
    tpot_slo_ms: float
    since: float


@register
class PredictedLatencyProducer(DataProducer, RequestTracker, ResponseBodyProcessor):
    type_name = "predicted-latency-producer"
    # llm-d's producer consumes the prefix match and the prompt's tokens.
    needs_prefix_producer = True
    needs_tokens = True

    class Params(PluginParams):
        # Accepted for compatibility and ignored, as in llm-d.
        sampling_mean: float = 1000.0
        max_decode_token_samples_for_prediction: int = 0
        slo_buffer_factor: float = Field(default=1.0, gt=0)
        context_ttl: PositiveSeconds = Field(default=300.0, alias="contextTTL")
        streaming_mode: bool = False
        endpoint_role_label: str = ""
        predict_in_produce: bool = True
        prefix_match_info_producer_name: str = ""
        in_flight_load_producer_name: str = ""
        use_encoder_cache_features: bool = False
        encoder_cache_match_info_producer_name: str = ""

        @field_validator("use_encoder_cache_features")
        @classmethod
        def _no_encoder(cls, v: bool) -> bool:
            if v:
                raise ValueError("useEncoderCacheFeatures is not supported by this EPP")
            return v

    params: Params

    def __init__(
        self,
        params: Params | None = None,
        name: str | None = None,
        client: LatencyPredictorClient | None = None,
    ) -> None:
        super().__init__(params, name)
        self.client = client or LatencyPredictorClient(PredictorConfig.from_env())
        self._state: StateKey[_Request] = StateKey(f"{self.name}-latency")
        self._match: StateKey[PrefixMatch] = match_source(
            self.params.prefix_match_info_producer_name
        )
        self._inflight: InFlightLoadProducer | None = None
        # endpoint key -> request token -> its TPOT SLO and dispatch time
        self._running: dict[str, dict[int, _Running]] = {}
        self._tokens = itertools.count(1)
        self._last_failure_log = float("-inf")
        self._failures_since_log = 0
        self.metrics: PredictedLatencyMetrics | None = None

    def bind(self, plugins: PluginSet) -> None:
        self._inflight = bind_inflight_producer(
            plugins, self.params.in_flight_load_producer_name, f"{self.type_name} '{self.name}'"
        )

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = PredictedLatencyMetrics.of(registry)
        self.metrics.add_client(self.name, self.client)

    async def aclose(self) -> None:
        await self.client.aclose()

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        for ep in removed:
            self._running.pop(ep.key, None)

    # -- the requests this producer tracks per endpoint -----------------------------------

    def _live(self, key: str) -> dict[int, _Running]:
        """The endpoint's tracked requests, those older than ``contextTTL`` dropped."""
        running = self._running.get(key)
        if not running:
            return {}
        horizon = time.monotonic() - self.params.context_ttl
        for token in [t for t, r in running.items() if r.since < horizon]:
            del running[token]
        return running

    def dispatched(self, endpoint: Endpoint) -> int:
        return len(self._live(endpoint.key))

    def _min_tpot_slo(self, endpoint: Endpoint) -> float:
        running = self._live(endpoint.key)
        return min((r.tpot_slo_ms for r in running.values()), default=0.0)

    def _untrack(self, key: str, token: int) -> None:
        running = self._running.get(key)
        if running is not None:
            running.pop(token, None)
            if not running:
                del self._running[key]

    # -- before scheduling ----------------------------------------------------------------

    def _pod_type(self, ep: Endpoint) -> str:
        label = self.params.endpoint_role_label
        return ep.labels.get(label, "") if label else ""

    def _snapshot(self, ep: Endpoint) -> tuple[int, int]:
        if self._inflight is not None:
            return self._inflight.tokens(ep), self._inflight.requests(ep)
        return 0, int(ep.metrics.running)

    def prepare(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        return None  # the work is in ``settle``: it reads the prefix match, then awaits

    async def settle(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        request = cycle.request
        headers = request.headers
        state = _Request(
            ttft_slo_ms=slo_ms(headers, TTFT_SLO_HEADERS),
            tpot_slo_ms=slo_ms(headers, TPOT_SLO_HEADERS),
            input_tokens=len(tokenized_prompt(cycle).token_ids),
            model=request.requested_model or request.model,
            target_model=request.model,
        )
        match = cycle.get(self._match)
        for ep in endpoints:
            score = 0.0
            if match is not None and match.total_blocks:
                score = min(1.0, match.blocks(ep) / match.total_blocks)
            state.prefix_scores[ep.key] = score
            state.inflight[ep.key] = self._snapshot(ep)
        cycle.put(self._state, state)
        if not self.params.predict_in_produce or not endpoints:
            return
        requests = [
            PredictionRequest(
                kv_cache_percentage=ep.metrics.kv_usage,
                input_token_length=state.input_tokens,
                num_request_waiting=int(ep.metrics.waiting),
                num_request_running=state.inflight[ep.key][1],
                num_tokens_generated=1,
                prefix_cache_score=state.prefix_scores[ep.key],
                pod_type=self._pod_type(ep),
                prefill_tokens_in_flight=state.inflight[ep.key][0],
            )
            for ep in endpoints
        ]
        started = time.perf_counter()
        try:
            predictions = await self.client.predict_bulk_strict(requests)
        except PredictorError as exc:
            self._log_failure(cycle, exc)
            return
        if self.metrics is not None:
            self.metrics.record_prediction_duration(
                (self.name, self.type_name),
                state.model,
                state.target_model,
                time.perf_counter() - started,
            )
        p = self.params
        for ep, pred in zip(endpoints, predictions, strict=True):
            state.predictions[ep.key] = validate_prediction(
                pred,
                ttft_slo_ms=state.ttft_slo_ms,
                tpot_slo_ms=state.tpot_slo_ms,
                slo_buffer_factor=p.slo_buffer_factor,
                streaming=p.streaming_mode,
                endpoint_min_tpot_slo_ms=self._min_tpot_slo(ep),
                prefill_endpoint=self._pod_type(ep) == _PREFILL_ROLE,
                dispatched=self.dispatched(ep),
            )
        put_predictions(cycle, self.name, state.predictions)

    def _log_failure(self, cycle: CycleState, exc: PredictorError) -> None:
        self._failures_since_log += 1
        now = time.monotonic()
        if now - self._last_failure_log < _FAILURE_LOG_INTERVAL_S:
            log.debug("request %s: no latency prediction: %s", cycle.request.request_id, exc)
            return
        log.warning(
            "%s: no latency predictions (%d request(s) since the last report): %s",
            self.name, self._failures_since_log, exc,
        )  # fmt: skip
        self._last_failure_log = now
        self._failures_since_log = 0

    # -- dispatch and the response --------------------------------------------------------

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        state = cycle.get(self._state)
        targets = result.targets(result.primary)
        if state is None or not targets:
            return _noop, _noop
        prefills = result.targets(result.prefill_profile)
        state.target = targets[0]
        state.prefill = prefills[0] if prefills else None
        state.dispatched_at = time.monotonic()
        state.token = next(self._tokens)
        if state.tpot_slo_ms >= 0:
            running = self._running.setdefault(state.target.key, {})
            running[state.token] = _Running(state.tpot_slo_ms, state.dispatched_at)
        return _noop, self._release(state)

    def _release(self, state: _Request) -> Release:
        assert state.target is not None
        key, token = state.target.key, state.token

        def release() -> None:
            self._untrack(key, token)

        return release

    def reassign(
        self, cycle: CycleState, served: SchedulingResult, release_decode: Release
    ) -> Release:
        state = cycle.get(self._state)
        targets = served.targets(served.primary)
        if state is None or state.target is None or not targets:
            return release_decode
        release_decode()
        state.target = targets[0]
        if state.tpot_slo_ms >= 0 and not state.finished:
            running = self._running.setdefault(state.target.key, {})
            running[state.token] = _Running(state.tpot_slo_ms, state.dispatched_at)
        return self._release(state)

    def response_body(self, cycle: CycleState, end_of_stream: bool) -> None:
        state = cycle.get(self._state)
        if state is None or state.target is None or state.finished:
            return
        now = time.monotonic()
        streaming = self.params.streaming_mode
        if state.ttft_ms == 0:
            if streaming and not end_of_stream:
                self._first_token(state, now)
        else:
            state.chunks += 1
        if not end_of_stream:
            return
        state.finished = True
        if not streaming:
            self._first_token(state, now)
        avg_tpot = 0.0
        if state.ttft_ms > 0 and state.chunks > 1:
            e2e_ms = (now - state.dispatched_at) * 1000.0
            avg_tpot = (e2e_ms - state.ttft_ms) / (state.chunks - 1)
        if avg_tpot > 0:
            self._train(state, state.target, tpot_ms=avg_tpot)
        self._record(state, avg_tpot)
        self._untrack(state.target.key, state.token)

    def _record(self, state: _Request, avg_tpot_ms: float) -> None:
        """The finished response's metrics: TTFT (the prediction of the prefill endpoint
        when there was one), and with a TPOT the prediction of the decode endpoint."""
        if self.metrics is None or state.target is None or state.ttft_ms <= 0:
            return
        plugin = (self.name, self.type_name)
        first = state.predictions.get((state.prefill or state.target).key)
        self.metrics.record_latency(
            "ttft",
            plugin,
            state.model,
            state.target_model,
            actual_ms=state.ttft_ms,
            predicted_ms=first.ttft if first is not None else None,
            slo_ms=state.ttft_slo_ms,
        )
        if avg_tpot_ms <= 0:
            return
        decode = state.predictions.get(state.target.key)
        self.metrics.record_latency(
            "tpot",
            plugin,
            state.model,
            state.target_model,
            actual_ms=avg_tpot_ms,
            predicted_ms=decode.tpot if decode is not None else None,
            slo_ms=state.tpot_slo_ms,
        )

    def _first_token(self, state: _Request, now: float) -> None:
        """The TTFT sample (without streaming: the end-to-end latency), taken on the
        prefill endpoint when the request was disaggregated."""
        assert state.target is not None
        state.ttft_ms = (now - state.dispatched_at) * 1000.0
        state.chunks = 1
        where = state.prefill or state.target
        self._train(
            state,
            where,
            ttft_ms=state.ttft_ms,
            prefix_score=state.prefix_scores.get(where.key, 0.0),
        )

    def _train(
        self,
        state: _Request,
        where: Endpoint,
        *,
        ttft_ms: float = 0.0,
        tpot_ms: float = 0.0,
        prefix_score: float = 0.0,
    ) -> None:
        """One training sample observed on ``where`` (a TTFT or a TPOT, the other 0)."""
        tokens, requests = state.inflight.get(where.key, (0, 0))
        m = where.metrics
        self.client.add_training(
            [
                TrainingEntry(
                    kv_cache_percentage=m.kv_usage,
                    input_token_length=state.input_tokens,
                    num_request_waiting=int(m.waiting),
                    num_request_running=requests,
                    num_tokens_generated=0,
                    actual_ttft_ms=ttft_ms,
                    actual_tpot_ms=tpot_ms,
                    prefix_cache_score=prefix_score,
                    pod_type=self._pod_type(where),
                    prefill_tokens_in_flight=tokens,
                )
            ]
        )


def _noop() -> None:
    return None
