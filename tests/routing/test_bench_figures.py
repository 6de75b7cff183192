"""The routing benchmark's figures that come from the request stream alone: what the
warm-up leaves out, and the ideal TTFT no router can beat."""

from __future__ import annotations

import pytest
from aiohttp import web

from benchmarks.routing_bench import (
    EngineModel,
    Outcome,
    RunResult,
    drive,
    ideal_ttfts,
    measured,
    pool_busy,
    summarise,
)
from benchmarks.routing_workloads import Request, generate


def _request(at: float, words: list[str]) -> Request:
    return Request(at, "chat", "s", 0, " ".join(words), len(words), 8)


def test_the_warm_up_is_left_out() -> None:
    requests = [_request(t, ["w"]) for t in (0.0, 9.99, 10.0, 25.0)]
    assert measured(requests, ["a", "b", "c", "d"], 10.0) == ["c", "d"]
    assert measured(requests, [1, 2, 3, 4], 0.0) == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        measured(requests, [1, 2], 0.0)


def test_pool_busy_is_model_time_over_the_pools_time() -> None:
    # Four engines for 10 s of wall clock at a time scale of 0.2: 8 s of model time in all.
    assert pool_busy(4000.0, 4, 10.0, 0.2) == pytest.approx(0.5)
    assert pool_busy(8000.0, 4, 10.0, 0.2) == pytest.approx(1.0)
    assert pool_busy(8000.0, 4, 10.0, 1.0) == pytest.approx(0.2)
    assert pool_busy(0.0, 32, 60.0, 0.2) == 0.0


def test_ideal_ttft_counts_only_the_blocks_no_earlier_prompt_holds() -> None:
    model = EngineModel(block_size=4, ttft_base_ms=10.0, prefill_ms_per_token=1.0)
    shared = [f"s{i}" for i in range(8)]  # two blocks
    first = _request(0.0, [*shared, "a1", "a2"])
    # The two shared blocks are held; the rest (a third block and two tokens) is not.
    second = _request(1.0, [*shared, "b1", "b2", "b3", "b4", "b5", "b6"])
    # Same blocks, but after a different first block: a prefix only counts from the start.
    third = _request(2.0, ["x0", "x1", "x2", "x3", *shared[4:]])
    # All of the second's blocks are held; only its two trailing tokens are computed.
    fourth = _request(3.0, second.prompt.split())
    assert ideal_ttfts([first, second, third, fourth], model) == pytest.approx(
        [0.020, 0.016, 0.018, 0.012]
    )


def test_steady_conversations_need_less_than_their_first_turns() -> None:
    # Later turns repeat their conversation; the first ones compute a system prompt.
    requests = generate("chat", rate=8.0, duration_s=150.0, seed=1, think_s=20.0)
    ideal = ideal_ttfts(requests, EngineModel())
    first = sorted(x for r, x in zip(requests, ideal, strict=True) if r.turn == 0)
    later = sorted(x for r, x in zip(requests, ideal, strict=True) if r.turn >= 2)
    assert later and first
    assert later[len(later) // 2] < first[-1]
    # A later turn computes at most its answer and new message (300 + 200 tokens, their
    # two role words and colons), the previous prompt's partial block, and the fixed cost.
    assert later[-1] <= (20 + (500 + 4 + 15) * 0.25) / 1000


def test_shares_within_every_target_count_failures_against_them() -> None:
    result = RunResult("c", 4, "chat", 0.8, 1.0)
    done = [Outcome(ttft, ttft + 1.0, 10, 0.0) for ttft in (0.1, 0.3, 0.7, 2.0)]
    summarise(result, [*done, None], slo_s=2.0, duration_s=10.0)
    assert result.within == pytest.approx({"0.25": 0.2, "0.5": 0.4, "1": 0.6, "2": 0.8})
    assert result.within_slo == pytest.approx(0.8)
    assert result.errors == 1
    # Measured at a fifth of model time: 0.1 s is 0.02 s of model time.
    summarise(result, done, slo_s=1.0, duration_s=10.0, time_scale=0.2)
    assert result.within == pytest.approx({"0.25": 0.75, "0.5": 1.0, "1": 1.0})


async def test_the_mark_falls_between_the_requests_around_it() -> None:
    events: list[str] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        events.append(request.headers["x-session-id"])
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": []}\n\n')
        await resp.write(b'data: {"usage": {"completion_tokens": 2}}\n\ndata: [DONE]\n\n')
        return resp

    async def mark() -> None:
        events.append("mark")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/completions"
    requests = [
        Request(0.0, "chat", "before", 0, "a b", 2, 2),
        Request(3.0, "chat", "after", 0, "a b", 2, 2),
    ]
    try:
        outcomes = await drive(url, requests, mark=(1.0, mark))
    finally:
        await runner.cleanup()
    assert events == ["before", "mark", "after"]
    assert [o.tokens if o else None for o in outcomes] == [2, 2]
