"""Concurrent legs: the prefill and the decode sent at once (connectors that pair them).

Both legs are retried together on the next prefiller while nothing has reached the
client; a prefill that fails later ends the relayed stream with an error event. A
connector whose prefill outlives its decode has it left to finish (detached), counted.
"""

from __future__ import annotations

import asyncio
import random
import time

from common import deadlines
from common.json_codec import dumps
from sidecar.connectors import Connector, LegContext, PrefillResult
from sidecar.context import RequestContext
from sidecar.decode_stage import DecodeStage
from sidecar.errors import PrefillError, PrefillTimeout
from sidecar.metrics import Metrics
from sidecar.policy import Policy
from sidecar.prefill_stage import PrefillStage, leg_context
from sidecar.server import StreamResponse
from sidecar.upstream import Retryable

__all__ = ["ConcurrentStage"]


class ConcurrentStage:
    """Paired prefill and decode legs, over the prefill and decode stages."""

    def __init__(
        self,
        *,
        connector: Connector,
        prefill: PrefillStage,
        decode: DecodeStage,
        metrics: Metrics,
        policy: Policy,
    ) -> None:
        self.connector = connector
        self.prefill = prefill
        self.decode = decode
        self.metrics = metrics
        self.policy = policy
        # Prefill legs left to finish after their decode answered (see Connector).
        self._detached: set[asyncio.Future[PrefillResult]] = set()

    async def run(self, ctx: RequestContext) -> StreamResponse:
        """Both legs at once, retried together on the next prefiller while nothing has
        reached the client; each attempt pairs the legs afresh (a new room, transfer id)."""
        ex = ctx.ex
        started = time.perf_counter()
        try:
            while True:
                target = ctx.plan.prefiller(ex.prefill_attempts)
                ex.prefill_attempts += 1
                ex.prefiller = target.authority
                leg = leg_context(ctx, target, await self.prefill.prepare(target))
                try:
                    return await self._once(ctx, leg)
                except Retryable as exc:
                    if ex.response_started or ex.prefill_attempts > self.policy.prefill_max_retries:
                        self.metrics.prefill_failures.labels(reason=exc.error.reason).inc()
                        raise exc.error from None
                    self.metrics.prefill_retries.labels(reason=exc.error.reason).inc()
                    ex.abort = None
                    backoff = self.policy.prefill_retry_backoff * ex.prefill_attempts
                    await asyncio.sleep(backoff + random.uniform(0, backoff))
        finally:
            ex.prefill_s = time.perf_counter() - started

    async def _once(self, ctx: RequestContext, leg: LegContext) -> StreamResponse:
        """One paired attempt. A failed prefill ends the decode leg: with ``Retryable``
        (or the error) before the client saw a byte, with an error event after it. A
        prefill whose generation finished leaves nothing to pull: the decode is replaced
        by a local one when the client has seen nothing yet."""
        ex = ctx.ex
        hold = self.connector.commit_timeout
        prefill = asyncio.ensure_future(self._prefill(ctx, leg, hold))
        decode_body = dumps(self.connector.decode_body(leg, None))
        relay = asyncio.ensure_future(
            self.decode.run(
                ctx,
                decode_body,
                headers=self.decode.leg_headers(ctx, leg, None),
                commit=prefill if hold is not None else None,
            )
        )

        def stop_decode(task: asyncio.Future[PrefillResult]) -> None:
            if task.cancelled():
                return
            failure = task.exception()
            if failure is not None:
                ex.abort = failure.error if isinstance(failure, Retryable) else failure
                relay.cancel()
            elif task.result().generation_finished and not ex.response_started:
                relay.cancel()

        prefill.add_done_callback(stop_decode)
        answered: StreamResponse | None = None
        try:
            answered = await relay
            if answered.status >= 500:
                # The decode could not use what prepare() learned (e.g. the prefiller
                # restarted with a new engine id): ask again next time.
                self.prefill.forget(leg.prefiller)
            return answered
        except asyncio.CancelledError:
            # stop_decode cancels the relay (see above); anything else (the client left,
            # the prefill still running) is a cancellation of this request.
            current = asyncio.current_task()
            if not prefill.done() or prefill.cancelled() or (current and current.cancelling()):
                raise
            failure = prefill.exception()
            if failure is not None:
                raise failure from None
            ex.abort = None
            return await self.decode.generation_finished(ctx, leg)
        finally:
            prefill.remove_done_callback(stop_decode)
            if (
                answered is not None
                and not prefill.done()
                and self.connector.prefill_outlives_decode
            ):
                self._detach(prefill)
            else:
                if not prefill.done():
                    prefill.cancel()
                await asyncio.gather(prefill, return_exceptions=True)

    def _detach(self, prefill: asyncio.Future[PrefillResult]) -> None:
        """Let a prefill leg run on after its request answered; its outcome is counted by
        :meth:`_prefill` and otherwise dropped."""
        self._detached.add(prefill)

        def done(task: asyncio.Future[PrefillResult]) -> None:
            self._detached.discard(task)
            if not task.cancelled():
                task.exception()  # retrieved: a failure is already counted

        prefill.add_done_callback(done)

    async def _prefill(
        self, ctx: RequestContext, leg: LegContext, bound: float | None = None
    ) -> PrefillResult:
        """The prefill of concurrent legs; ``bound``: seconds the held decode waits for it."""
        started = time.perf_counter()
        try:
            try:
                async with deadlines.timeout(bound):
                    _, result, _ = await self.prefill.once(ctx, leg.prefiller, paired=leg)
            except TimeoutError:
                raise PrefillTimeout(
                    f"prefill at {leg.prefiller} did not complete within {bound:g}s while"
                    " the decode waited for its KV"
                ) from None
            return result
        except PrefillError as exc:
            self.metrics.prefill_failures.labels(reason=exc.reason).inc()
            raise
        finally:
            self.metrics.prefill_seconds.observe(time.perf_counter() - started)
