"""Coalescing of concurrent bulk prediction calls into one HTTP request (llm-d's).

Every call is queued; the first call of a batch opens a window (``coalesceWindow``,
llm-d's default 1 ms). When the window closes, or as soon as the queued rows reach
``maxCoalescedRows`` (0: no cap), the queued calls' rows go out together in one call of
``send``, and each caller gets back its own slice of the answer, in order. A batch that
fails fails each of its callers with a copy of the same error; an answer with the wrong
number of rows fails them all too. A caller that stops waiting (its own timeout,
cancellation) is skipped when the answer arrives; the batch goes on for the others.

With a row cap a batch never grows past it: a call whose rows would overflow the
queued batch sends that batch first and starts the next one (a single call larger than
the cap goes alone). llm-d instead dispatches once the cap is reached or passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

Row = TypeVar("Row")
Answer = TypeVar("Answer")


@dataclass(slots=True)
class _Call(Generic[Row, Answer]):
    rows: Sequence[Row]
    result: asyncio.Future[list[Answer]]


class Coalescer(Generic[Row, Answer]):
    """Joins the rows of calls made within ``window_s`` of a batch's first call into one
    ``send``. ``error`` builds the error of a closed coalescer or of a short answer."""

    def __init__(
        self,
        send: Callable[[list[Row]], Awaitable[list[Answer]]],
        window_s: float,
        max_rows: int = 0,
        *,
        error: Callable[[str], Exception] = RuntimeError,
    ) -> None:
        self._send = send
        self.window_s = window_s
        self.max_rows = max_rows
        self._error = error
        self._pending: list[_Call[Row, Answer]] = []
        self._rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0  # calls of ``send`` so far

    async def submit(self, rows: Sequence[Row]) -> list[Answer]:
        """This call's answers, from the batch it joins."""
        if self._closed:
            raise self._error("closed")
        loop = asyncio.get_running_loop()
        if self.max_rows and self._pending and self._rows + len(rows) > self.max_rows:
            self._dispatch()
        call: _Call[Row, Answer] = _Call(rows, loop.create_future())
        self._pending.append(call)
        self._rows += len(rows)
        if self.max_rows and self._rows >= self.max_rows:
            self._dispatch()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._dispatch)
        try:
            return await call.result
        finally:
            # A caller that gave up leaves a cancelled future: its answer is dropped.
            call.result.cancel()

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._rows = self._pending, [], 0
        batch = [c for c in batch if not c.result.done()]
        if not batch:
            return
        self.batches += 1
        task = asyncio.get_running_loop().create_task(self._run(batch), name="prediction batch")
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _run(self, batch: list[_Call[Row, Answer]]) -> None:
        rows = [row for call in batch for row in call.rows]
        try:
            answers = await self._send(rows)
            if len(answers) != len(rows):
                raise self._error(f"expected {len(rows)} answers, got {len(answers)}")
        except asyncio.CancelledError:
            _fail(batch, self._error("closed"))
            raise
        except Exception as exc:
            _fail(batch, exc)
            return
        start = 0
        for call in batch:
            end = start + len(call.rows)
            if not call.result.done():
                call.result.set_result(answers[start:end])
            start = end

    async def aclose(self) -> None:
        """Fail the queued calls and stop the batches in flight."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending, self._rows = self._pending, [], 0
        _fail(pending, self._error("closed"))
        tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _fail(batch: Sequence[_Call[Row, Answer]], exc: BaseException) -> None:
    for call in batch:
        if not call.result.done():
            call.result.set_exception(copy.copy(exc))
