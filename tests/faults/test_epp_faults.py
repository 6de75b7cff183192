"""EPP-side faults over the local stack: the EPP restarts under load, an endpoint leaves
discovery, an engine's metrics go stale, and an ext_proc stream ends early.

Chosen behaviours (see epp/envoy_config.py): while the EPP is down or its stream breaks,
Envoy fails closed with a 503 whose JSON error body has type
``endpoint_picker_unavailable``; a request whose response was already passing through
the crashed EPP's stream is cut (the connection ends; no hang). An endpoint that leaves
discovery gets no new requests once the EPP has reloaded, while its in-flight ones
finish. An endpoint whose /metrics stops answering is scored as busy (pessimistic
signals) but stays routable, and the EPP logs the transition both ways.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.faults.epp_support import EppStack, Outcome, start_epp_stack, wait_for

pytestmark = [
    pytest.mark.faults,
    pytest.mark.envoy,
    pytest.mark.asyncio(loop_scope="module"),
]

_CLIENTS = 4


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EppStack]:
    running = await start_epp_stack(Path(tmp_path_factory.mktemp("epp-faults")))
    try:
        yield running
    finally:
        await running.session.close()
        await running.stack.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def env(shared: EppStack) -> AsyncIterator[EppStack]:
    """The shared stack, with its logs marked; faults and endpoints restored afterwards."""
    shared.mark_logs()
    yield shared
    await shared.clear_faults()
    if shared.endpoints_changed:
        await shared.set_endpoints(None)


# -- EPP restarts under load -----------------------------------------------------------


def _classify(outcome: Outcome) -> str:
    if outcome.ok:
        return "ok"
    if outcome.error is None and outcome.status is not None and outcome.status >= 500:
        error = outcome.json_error()
        assert error is not None, f"a refusal without a JSON error body: {outcome}"
        assert error["type"] == "endpoint_picker_unavailable", outcome
        assert outcome.status == 503, outcome
        return "refused"
    return "cut"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["crash", "graceful"])
async def test_epp_restart_under_load(env: EppStack, sig: signal.Signals) -> None:
    outcomes: list[Outcome] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            outcome = await env.complete(env.prompt(long=n % 3 == 0), stream=n % 2 == 0)
            outcomes.append(outcome)
            if not outcome.ok:
                await asyncio.sleep(0.02)  # a client's back-off, keeps the loop from spinning

    async def served_since(t: float, n: int) -> bool:
        return sum(1 for o in outcomes if o.ok and o.started >= t) >= n

    clients = [asyncio.create_task(client(i)) for i in range(_CLIENTS)]
    try:
        await wait_for(lambda: served_since(0.0, 2 * _CLIENTS), "load flows before the restart")
        before = len(outcomes)
        await env.stack.restart_epp(sig)
        back = time.monotonic()
        recovery = await wait_for(lambda: served_since(back, _CLIENTS), "served again", 5.0)
        stop.set()
        async with asyncio.timeout(15):
            await asyncio.gather(*clients)
    finally:
        stop.set()
        for task in clients:
            task.cancel()

    kinds = [_classify(o) for o in outcomes]
    print(
        sig,
        {k: kinds.count(k) for k in set(kinds)},
        recovery,
        [o.error for o in outcomes if o.error][:3],
        max(o.elapsed for o in outcomes),
    )
    during = kinds[before:]
    assert during.count("refused") > 0, "no request met the EPP while it was down"
    if sig == signal.SIGTERM:
        # In-flight streams drain on SIGTERM: nothing is cut, new requests are refused.
        assert "cut" not in kinds, [o for o in outcomes if _classify(o) == "cut"]
    assert max(o.elapsed for o in outcomes) < 10.0
    assert recovery < 5.0
    await env.assert_healthy()
