"""Client of the external latency predictor (llm-d's training and prediction servers).

The protocol is llm-d's:

- predictions: ``POST <prediction URL>/predict/bulk/strict`` with
  ``{"requests": [<features>...]}``; the answer ``{"predictions": [{"ttft_ms",
  "tpot_ms", ...}...]}`` holds one prediction per request, in order. One URL of
  ``PREDICTION_SERVER_URL`` (comma-separated) is picked at random per call.
- training: samples are buffered and sent every ``LATENCY_FLUSH_INTERVAL_SEC`` as
  ``POST <TRAINING_SERVER_URL>/add_training_data_bulk`` with ``{"entries": [...]}``
  (the server answers 202); a buffer above ``LATENCY_MAX_SAMPLE_SIZE`` is sampled
  down, keeping the TTFT/TPOT proportions. A batch that fails to send is dropped.

Environment (llm-d's names and defaults): ``TRAINING_SERVER_URL``
(http://localhost:8000), ``PREDICTION_SERVER_URL`` (http://localhost:8001),
``LATENCY_MAX_SAMPLE_SIZE`` (1000), ``LATENCY_FLUSH_INTERVAL_SEC`` (1),
``LATENCY_HTTP_TIMEOUT_SEC`` (10), ``LATENCY_MAX_BULK_SIZE`` (100, at most 100),
``LATENCY_MAX_CONCURRENT_DISPATCHES`` (36), ``LATENCY_COALESCE_WINDOW_MS`` (1; 0 turns
coalescing off), ``LATENCY_MAX_COALESCED_ROWS`` (0: no cap). Invalid values keep the
default.

Concurrent prediction calls are coalesced as llm-d's client does (``epp.plugins.
latency_coalescer``): the calls made within the window of a batch's first call go out
as one bulk request, at most ``LATENCY_MAX_COALESCED_ROWS`` rows when set (each call is
still at most ``LATENCY_MAX_BULK_SIZE``); each caller gets its own predictions, and a
failed batch fails each of its callers as a lone call would fail.

Every failure (connection refused, timeout, non-200 answer, malformed JSON, a request
the server would refuse) raises ``PredictorError``; callers treat it as "no
prediction". A request waits at most ``PREDICTION_TIMEOUT_S`` (1 s, or the HTTP
timeout if lower) for its predictions: a slow answer is useless for routing and must
not eat the decision's own deadline. After a failed request to the server (a call
refused before sending is not one) the client backs off (1 s, doubling up to 30 s):
calls fail at once without touching the network, then one call probes the predictor
again; a success ends the backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from epp.plugins.latency_coalescer import Coalescer

__all__ = [
    "LatencyPredictorClient",
    "Prediction",
    "PredictionRequest",
    "PredictorConfig",
    "PredictorError",
    "TrainingEntry",
    "stratified_sample",
]

log = logging.getLogger(__name__)

MAX_BULK_SIZE_LIMIT = 100
PREDICTION_TIMEOUT_S = 1.0
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0


class PredictorError(Exception):
    """The predictor gave no usable answer."""


def _int_env(env: Mapping[str, str], name: str, default: int, *, low: int = 1) -> int:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        log.warning("%s=%r is not an integer; using %d", name, raw, default)
        return default
    if value < low:
        log.warning("%s=%r is out of range; using %d", name, raw, default)
        return default
    return value


@dataclass(frozen=True)
class PredictorConfig:
    training_url: str = "http://localhost:8000"
    prediction_urls: tuple[str, ...] = ("http://localhost:8001",)
    max_sample_size: int = 1000
    flush_interval_s: float = 1.0
    http_timeout_s: float = 10.0
    max_bulk_size: int = MAX_BULK_SIZE_LIMIT
    max_concurrent_dispatches: int = 36
    coalesce_window_s: float = 0.001
    max_coalesced_rows: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PredictorConfig:
        env = os.environ if env is None else env
        d = cls()
        urls = d.prediction_urls
        if env.get("PREDICTION_SERVER_URL"):
            urls = tuple(u.strip() for u in env["PREDICTION_SERVER_URL"].split(","))
        bulk = _int_env(env, "LATENCY_MAX_BULK_SIZE", d.max_bulk_size)
        return cls(
            training_url=env.get("TRAINING_SERVER_URL") or d.training_url,
            prediction_urls=urls,
            max_sample_size=_int_env(env, "LATENCY_MAX_SAMPLE_SIZE", d.max_sample_size),
            flush_interval_s=float(
                _int_env(env, "LATENCY_FLUSH_INTERVAL_SEC", int(d.flush_interval_s))
            ),
            http_timeout_s=float(_int_env(env, "LATENCY_HTTP_TIMEOUT_SEC", int(d.http_timeout_s))),
            max_bulk_size=bulk if bulk <= MAX_BULK_SIZE_LIMIT else d.max_bulk_size,
            max_concurrent_dispatches=_int_env(
                env, "LATENCY_MAX_CONCURRENT_DISPATCHES", d.max_concurrent_dispatches
            ),
            coalesce_window_s=_int_env(
                env, "LATENCY_COALESCE_WINDOW_MS", round(d.coalesce_window_s * 1000), low=0
            )
            / 1000.0,
            max_coalesced_rows=_int_env(
                env, "LATENCY_MAX_COALESCED_ROWS", d.max_coalesced_rows, low=0
            ),
        )


@dataclass(frozen=True, slots=True)
class PredictionRequest:
    """One endpoint's features, as the prediction server names them."""

    kv_cache_percentage: float
    input_token_length: int
    num_request_waiting: int
    num_request_running: int
    num_tokens_generated: int
    prefix_cache_score: float
    encoder_input_size: int = 0
    encoder_matched_size: int = 0
    pod_type: str = ""
    prefill_tokens_in_flight: int = 0
    decode_tokens_in_flight: int = 0

    def problem(self) -> str | None:
        """Why the server would refuse these features, or None."""
        if not 0.0 <= self.kv_cache_percentage <= 1.0:
            return f"kv_cache_percentage must be in [0, 1], got {self.kv_cache_percentage}"
        if not 0.0 <= self.prefix_cache_score <= 1.0:
            return f"prefix_cache_score must be in [0, 1], got {self.prefix_cache_score}"
        for name in (
            "input_token_length",
            "num_request_waiting",
            "num_request_running",
            "num_tokens_generated",
            "encoder_input_size",
        ):
            if getattr(self, name) < 0:
                return f"{name} must be non-negative, got {getattr(self, name)}"
        if not 0 <= self.encoder_matched_size <= self.encoder_input_size:
            return "encoder_matched_size must be between 0 and encoder_input_size"
        return None

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        if not self.pod_type:
            del doc["pod_type"]
        return doc


@dataclass(frozen=True, slots=True)
class Prediction:
    ttft_ms: float
    tpot_ms: float


@dataclass(frozen=True, slots=True)
class TrainingEntry:
    """One observed latency with the features it was observed under."""

    kv_cache_percentage: float
    input_token_length: int
    num_request_waiting: int
    num_request_running: int
    num_tokens_generated: int
    actual_ttft_ms: float
    actual_tpot_ms: float
    prefix_cache_score: float
    encoder_input_size: int = 0
    encoder_matched_size: int = 0
    pod_type: str = ""
    prefill_tokens_in_flight: int = 0
    decode_tokens_in_flight: int = 0
    timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["timestamp"] = self.timestamp.isoformat().replace("+00:00", "Z")
        if not self.pod_type:
            del doc["pod_type"]
        return doc


def stratified_sample(
    entries: Sequence[TrainingEntry], max_size: int, rng: random.Random
) -> list[TrainingEntry]:
    """At most ``max_size`` entries, keeping the shares of TTFT samples, TPOT samples and
    the rest; the rounding remainder goes to the largest group."""
    if len(entries) <= max_size:
        return list(entries)
    ttft = [e for e in entries if e.actual_ttft_ms > 0]
    tpot = [e for e in entries if e.actual_ttft_ms <= 0 < e.actual_tpot_ms]
    other = [e for e in entries if e.actual_ttft_ms <= 0 and e.actual_tpot_ms <= 0]
    groups = [ttft, tpot, other]
    sizes = [len(g) * max_size // len(entries) for g in groups]
    short = max_size - sum(sizes)
    if short > 0:
        largest = max(range(3), key=lambda i: (len(groups[i]), -i))
        sizes[largest] += short
    out: list[TrainingEntry] = []
    for group, size in zip(groups, sizes, strict=True):
        out.extend(rng.sample(group, min(size, len(group))))
    return out


class LatencyPredictorClient:
    """Bulk predictions and buffered training samples over HTTP. Started lazily on the
    event loop (the first call); ``aclose`` sends what is buffered and stops."""

    def __init__(
        self,
        config: PredictorConfig,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.clock = clock
        self.prediction_timeout_s = min(config.http_timeout_s, PREDICTION_TIMEOUT_S)
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._dispatch: asyncio.Semaphore | None = None
        self._pending: list[TrainingEntry] = []
        self._closed = False
        self._coalescer: Coalescer[PredictionRequest, Prediction] | None = None
        if config.coalesce_window_s > 0:
            self._coalescer = Coalescer(
                self._send,
                config.coalesce_window_s,
                config.max_coalesced_rows,
                error=lambda why: PredictorError(f"coalesced prediction: {why}"),
            )
        # Counters (also exported as metrics by the producer): prediction calls, and the
        # HTTP requests they took (fewer when coalesced).
        self.predictions_ok = 0
        self.predictions_failed = 0
        self.requests_ok = 0
        self.requests_failed = 0
        self.training_sent = 0
        self.training_dropped = 0

    def _ensure_started(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.config.http_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
            self._dispatch = asyncio.Semaphore(self.config.max_concurrent_dispatches)
            self._flusher = asyncio.create_task(self._flush_loop(), name="latency training")
        return self._session

    def _prediction_url(self) -> str:
        urls = self.config.prediction_urls
        if not urls:
            return self.config.training_url
        return urls[0] if len(urls) == 1 else self.rng.choice(urls)

    async def predict_bulk_strict(self, requests: Sequence[PredictionRequest]) -> list[Prediction]:
        """One prediction per request, in order; ``PredictorError`` on any failure."""
        try:
            self._check(requests)
            now = self.clock()
            if now < self._retry_at:
                raise PredictorError(
                    f"predictor unavailable, next attempt in {self._retry_at - now:.1f}s"
                )
            if self._backoff_s:
                self._retry_at = now + self._backoff_s  # this call probes; the others wait
            if self._coalescer is None:
                found = await self._send(requests)
            else:
                # The batch's own request is bounded by the prediction timeout; this
                # bound only guards the caller should that ever not hold.
                wait_s = self.prediction_timeout_s + self.config.coalesce_window_s + 0.5
                try:
                    async with asyncio.timeout(wait_s):
                        found = await self._coalescer.submit(requests)
                except TimeoutError:
                    raise PredictorError(f"no coalesced prediction within {wait_s:.1f}s") from None
        except PredictorError:
            self.predictions_failed += 1
            raise
        self.predictions_ok += 1
        return found

    def _check(self, requests: Sequence[PredictionRequest]) -> None:
        """Refuse, before any network call, what the server would refuse."""
        if self._closed:
            raise PredictorError("predictor client closed")
        if not requests:
            raise PredictorError("no prediction requests")
        if len(requests) > self.config.max_bulk_size:
            raise PredictorError(
                f"too many requests: {len(requests)} (max {self.config.max_bulk_size})"
            )
        for i, req in enumerate(requests):
            problem = req.problem()
            if problem is not None:
                raise PredictorError(f"request {i}: {problem}")

    async def _send(self, requests: Sequence[PredictionRequest]) -> list[Prediction]:
        """One HTTP request; a failure backs the client off, a success ends the backoff."""
        try:
            found = await self._post(requests)
        except PredictorError:
            self.requests_failed += 1
            self._backoff_s = min(max(2 * self._backoff_s, MIN_BACKOFF_S), MAX_BACKOFF_S)
            self._retry_at = self.clock() + self._backoff_s
            raise
        self.requests_ok += 1
        self._backoff_s = self._retry_at = 0.0
        return found

    async def _post(self, requests: Sequence[PredictionRequest]) -> list[Prediction]:
        if self._closed:
            raise PredictorError("predictor client closed")
        session = self._ensure_started()
        assert self._dispatch is not None
        url = self._prediction_url() + "/predict/bulk/strict"
        payload = {"requests": [r.to_json() for r in requests]}
        try:
            async with (
                asyncio.timeout(self.prediction_timeout_s),
                self._dispatch,
                session.post(url, json=payload) as resp,
            ):
                text = await resp.text()
                if resp.status != 200:
                    raise PredictorError(f"{url} answered {resp.status}: {text[:256]}")
                doc = json.loads(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PredictorError(f"{url}: {type(exc).__name__}: {exc}") from None
        preds = doc.get("predictions") if isinstance(doc, dict) else None
        if not isinstance(preds, list) or len(preds) != len(requests):
            raise PredictorError(f"{url}: expected {len(requests)} predictions")
        out: list[Prediction] = []
        for p in preds:
            try:
                out.append(Prediction(float(p["ttft_ms"]), float(p["tpot_ms"])))
            except (TypeError, KeyError, ValueError):
                raise PredictorError(f"{url}: malformed prediction {p!r:.128}") from None
        return out

    def add_training(self, entries: Sequence[TrainingEntry]) -> None:
        """Buffer samples for the next flush."""
        if self._closed:
            return
        self._pending.extend(entries)
        self._ensure_started()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval_s)
            try:
                await self.flush()
            except Exception:
                log.exception("latency training: flush failed")

    async def flush(self) -> None:
        """Send the buffered samples in one request (sampled down when too many)."""
        if not self._pending or self._session is None:
            return
        batch, self._pending = self._pending, []
        sent = stratified_sample(batch, self.config.max_sample_size, self.rng)
        self.training_dropped += len(batch) - len(sent)
        url = self.config.training_url + "/add_training_data_bulk"
        try:
            async with self._session.post(
                url, json={"entries": [e.to_json() for e in sent]}
            ) as resp:
                await resp.read()
                if resp.status != 202:
                    log.warning("latency training: %s answered %d", url, resp.status)
                    self.training_dropped += len(sent)
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("latency training: %s: %s: %s", url, type(exc).__name__, exc)
            self.training_dropped += len(sent)
            return
        self.training_sent += len(sent)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._coalescer is not None:
            await self._coalescer.aclose()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        with contextlib.suppress(Exception):
            await self.flush()
        if self._session is not None:
            await self._session.close()
