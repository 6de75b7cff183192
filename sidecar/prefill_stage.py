"""The prefill stage: attempts along the prefiller list, each one leg to a prefiller.

An attempt that fails with a retryable error (connection errors, 502/503/504, a
timeout) moves on to the next prefiller of the plan, with tenacity's jittered backoff;
each attempt is bounded by ``prefill_timeout``. What a connector learns once per
prefiller (``Connector.prepare``) is cached here and forgotten when the prefiller fails.
"""

from __future__ import annotations

import asyncio
import random
import time

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from common.json_codec import dumps, loads
from sidecar import tracing
from sidecar.connectors import Connector, LegContext, PrefillResult
from sidecar.context import RequestContext
from sidecar.errors import (
    PrefillError,
    PrefillRejected,
    PrefillTimeout,
    PrefillUnavailable,
    PrepareError,
    SidecarError,
)
from sidecar.headers import TRACEPARENT
from sidecar.metrics import Metrics
from sidecar.policy import MAX_PREFILL_ANSWER, Policy
from sidecar.routing import HostPort
from sidecar.tracing import Stage, traced
from sidecar.upstream import Retryable, StageErrors, Upstream

__all__ = ["PrefillStage", "leg_context"]

_PREFILL_ERRORS = StageErrors(timeout=PrefillTimeout, failed=PrefillUnavailable)


def leg_context(
    ctx: RequestContext, target: HostPort, prepared: object | None = None
) -> LegContext:
    """What a connector sees of one request and its prefiller."""
    return LegContext(
        shape=ctx.shape,
        body=ctx.body,
        request_id=ctx.ex.request_id,
        prefiller=target,
        prepared=prepared,
        extra=ctx.extra,
        kv_source=ctx.kv_source,
    )


class PrefillStage:
    """Prefill legs to the prefillers of a plan, and the per-prefiller preparations."""

    def __init__(
        self, *, connector: Connector, upstream: Upstream, metrics: Metrics, policy: Policy
    ) -> None:
        self.connector = connector
        self.upstream = upstream
        self.metrics = metrics
        self.policy = policy
        self._prepared: dict[HostPort, asyncio.Task[object | None]] = {}
        self._needs_prepare = type(connector).prepare is not Connector.prepare
        backoff = policy.prefill_retry_backoff
        # Attempts after the first retry: exponential from twice the backoff, with jitter.
        self._retry_wait = wait_exponential_jitter(
            multiplier=backoff * 2, max=max(backoff * 16, 0.001), jitter=backoff
        )

    async def run(self, ctx: RequestContext) -> tuple[LegContext, PrefillResult, int | None]:
        """The prefill stage: attempts along the prefiller list, retried while retryable."""
        ex = ctx.ex
        started = time.perf_counter()

        def count_retry(state: RetryCallState) -> None:
            outcome = state.outcome
            failure = outcome.exception() if outcome is not None else None
            reason = failure.error.reason if isinstance(failure, Retryable) else "unknown"
            self.metrics.prefill_retries.labels(reason=reason).inc()

        def next_target() -> HostPort:
            target = ctx.plan.prefiller(ex.prefill_attempts)
            ex.prefill_attempts += 1
            ex.prefiller = target.authority
            return target

        try:
            # The first attempt runs without the retry machinery: it is the hot path.
            try:
                return await self.once(ctx, next_target())
            except Retryable as exc:
                if self.policy.prefill_max_retries == 0:
                    raise exc.error from None
                self.metrics.prefill_retries.labels(reason=exc.error.reason).inc()
                backoff = self.policy.prefill_retry_backoff
                await asyncio.sleep(backoff + random.uniform(0, backoff))
            retrying = AsyncRetrying(
                stop=stop_after_attempt(self.policy.prefill_max_retries),
                wait=self._retry_wait,
                retry=retry_if_exception_type(Retryable),
                before_sleep=count_retry,
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    return await self.once(ctx, next_target())
        except Retryable as exc:
            raise exc.error from None
        finally:
            ex.prefill_s = time.perf_counter() - started
            self.metrics.prefill_seconds.observe(ex.prefill_s)
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def prepare(self, target: HostPort) -> object | None:
        if not self._needs_prepare:
            return None
        task = self._prepared.get(target)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.ensure_future(self.connector.prepare(target, self.upstream.session))
            self._prepared[target] = task
        try:
            # shield: one caller going away must not cancel the shared preparation
            return await asyncio.shield(task)
        except SidecarError:
            self.forget(target)
            raise
        except Exception as exc:
            self.forget(target)
            raise PrepareError(f"preparing prefiller {target} failed: {exc!r}") from exc

    @traced(Stage.PREFILL)
    async def once(
        self, ctx: RequestContext, target: HostPort, paired: LegContext | None = None
    ) -> tuple[LegContext, PrefillResult, int | None]:
        """One prefill attempt; ``paired`` is the decode leg's context (concurrent legs)."""
        # Concurrent legs must agree on pairing and preparation: they share one context.
        leg = paired if paired is not None else leg_context(ctx, target, await self.prepare(target))
        result, cached = await self._send_leg(ctx, leg)
        return leg, result, cached

    async def _send_leg(
        self, rctx: RequestContext, ctx: LegContext
    ) -> tuple[PrefillResult, int | None]:
        target = ctx.prefiller
        shape = ctx.shape
        payload = dumps(self.connector.prefill_body(ctx))
        leg_headers = rctx.headers.copy()
        leg_headers.update(self.connector.prefill_headers(ctx))
        leg_headers[TRACEPARENT] = rctx.ex.trace.leg_header()
        url = target.base_url + shape.path
        try:
            fetched = await self.upstream.fetch(
                url,
                leg_headers,
                payload,
                target=str(target),
                errors=_PREFILL_ERRORS,
                limit=MAX_PREFILL_ANSWER,
                timeout=self.policy.prefill_timeout,
            )
        except (Retryable, PrefillError):
            self.forget(target)
            raise
        status, answer = fetched.status, fetched.body
        tracing.note("llm_d.pd_proxy.prefill.status_code", status)
        if 400 <= status < 500:
            raise PrefillRejected(status, answer, fetched.content_type)
        if not 200 <= status < 300:
            self.forget(target)
            raise PrefillUnavailable(f"prefill at {target} answered {status}", f"status_{status}")
        try:
            parsed = loads(answer)
        except ValueError:
            raise PrefillUnavailable(
                f"prefill at {target} answered with malformed JSON", "malformed_answer"
            ) from None
        tracing.note_usage(parsed)
        result = self.connector.read_prefill(ctx, parsed)
        # A prefill engine without --enable-prompt-tokens-details reports no count: it
        # found nothing it will own up to, and the client is billed for that view.
        cached = shape.read_cached(parsed)
        return result, 0 if cached is None else cached

    def forget(self, target: HostPort) -> None:
        self._prepared.pop(target, None)
