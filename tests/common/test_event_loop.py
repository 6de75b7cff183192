"""common.event_loop: the loop the server processes run on."""

from __future__ import annotations

import asyncio

import uvloop

from common import event_loop


def test_run_serves_on_uvloop_and_returns_the_result() -> None:
    async def which_loop() -> type[asyncio.AbstractEventLoop]:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop())

    assert event_loop.run(which_loop()) is uvloop.Loop
