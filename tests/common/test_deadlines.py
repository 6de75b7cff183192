"""``common.deadlines.timeout`` keeps ``asyncio.timeout``'s contract, on both loops."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from common import deadlines
from common.deadlines import timeout

# Slack for a loaded machine: a deadline must not fire early, and must fire.
LATE_S = 2.0


def _run(make: Callable[[], Awaitable[None]], loop_kind: str) -> None:
    if loop_kind == "uvloop":
        uvloop.run(make())
    else:
        asyncio.run(make())


LOOPS = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])


@LOOPS
def test_an_overdue_block_is_cancelled_and_the_scope_raises_timeout(loop_kind: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        scope = timeout(0.05)
        with pytest.raises(TimeoutError):
            async with scope:
                await asyncio.sleep(30)
        elapsed = loop.time() - started
        assert scope.expired()
        # Never early (uvloop's timers round to the millisecond), and not much late.
        assert 0.05 - 0.002 <= elapsed < 0.05 + LATE_S
        assert asyncio.current_task() is not None
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    _run(main, loop_kind)


@LOOPS
def test_a_block_that_finishes_in_time_leaves_nothing_armed(loop_kind: str) -> None:
    async def main() -> None:
        scope = timeout(10)
        async with scope:
            await asyncio.sleep(0)
        assert not scope.expired()
        wheel = deadlines._current.wheel
        assert wheel.slots == {}
        async with timeout(None) as unbounded:
            assert unbounded.when() is None

    _run(main, loop_kind)


@LOOPS
def test_another_cancellation_stays_a_cancellation(loop_kind: str) -> None:
    async def main() -> None:
        entered = asyncio.Event()

        async def bounded() -> None:
            async with timeout(30):
                entered.set()
                await asyncio.sleep(30)

        task = asyncio.create_task(bounded())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    _run(main, loop_kind)


@LOOPS
def test_nested_scopes_each_own_their_expiry(loop_kind: str) -> None:
    async def main() -> None:
        # The inner one expires: the outer block goes on.
        async with timeout(30) as outer:
            with pytest.raises(TimeoutError):
                async with timeout(0.01):
                    await asyncio.sleep(30)
        assert not outer.expired()
        # The outer one expires while the inner one is open: only the outer raises.
        inner_saw: list[type[BaseException]] = []
        with pytest.raises(TimeoutError):
            async with timeout(0.01):
                try:
                    async with timeout(30):
                        await asyncio.sleep(30)
                except BaseException as exc:
                    inner_saw.append(type(exc))
                    raise
        assert inner_saw == [asyncio.CancelledError]

    _run(main, loop_kind)


@LOOPS
def test_reschedule_moves_the_deadline(loop_kind: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with timeout(0.01) as scope:
            scope.reschedule(loop.time() + 30)
            await asyncio.sleep(0.1)
            scope.reschedule(None)
            await asyncio.sleep(0.05)
            assert scope.when() is None
        assert not scope.expired()
        with pytest.raises(TimeoutError):
            async with timeout(None) as late:
                late.reschedule(loop.time() - 1)  # already past: fires at once
                await asyncio.sleep(30)
        with pytest.raises(RuntimeError, match="finished"):
            scope.reschedule(None)
        with pytest.raises(RuntimeError, match="not been entered"):
            timeout(1).reschedule(None)
        entered = timeout(1)
        async with entered:
            pass
        with pytest.raises(RuntimeError, match="already been entered"):
            async with entered:
                pass

    _run(main, loop_kind)


def test_each_loop_gets_its_own_timers() -> None:
    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with timeout(0.01):
                await asyncio.sleep(30)

    # One thread, loops one after the other: a scope never arms a closed loop's timer.
    for kind in ("asyncio", "uvloop", "asyncio"):
        _run(main, kind)


@LOOPS
def test_many_deadlines_each_fire_in_their_own_time(loop_kind: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(7)

        async def bounded(delay: float, work: float) -> tuple[bool, float]:
            started = loop.time()
            try:
                async with timeout(delay):
                    await asyncio.sleep(work)
            except TimeoutError:
                return True, loop.time() - started
            return False, loop.time() - started

        cases = [(rng.uniform(0.01, 0.3), rng.choice([0.0, 30.0])) for _ in range(60)]
        results = await asyncio.gather(*(bounded(delay, work) for delay, work in cases))
        for (delay, work), (timed_out, elapsed) in zip(cases, results, strict=True):
            assert timed_out == (work > delay)
            if timed_out:
                assert delay - 0.002 <= elapsed < delay + LATE_S

    _run(main, loop_kind)


@LOOPS
def test_a_quiet_loop_is_left_without_a_timer(loop_kind: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for delay in (0.05, 0.02, 0.08):
            async with timeout(delay):
                pass
        wheel = deadlines._current.wheel
        assert wheel.slots == {}
        # The timer armed for the earliest slot fires once, finds nothing, and is not
        # armed again.
        give_up = loop.time() + 10
        while wheel._timer is not None:
            assert loop.time() < give_up, "the timer was armed again"
            await asyncio.sleep(0.01)
        assert wheel._heap == []

    _run(main, loop_kind)


def test_a_stopped_loop_left_open_does_not_keep_the_threads_timers() -> None:
    """The thread's wheel follows the loop running now, not the last one it served,
    even when that one was only stopped, not closed."""

    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with timeout(0.01):
                await asyncio.sleep(30)

    first, second = asyncio.new_event_loop(), uvloop.new_event_loop()
    try:
        first.run_until_complete(main())
        second.run_until_complete(main())
        first.run_until_complete(main())
    finally:
        first.close()
        second.close()
