"""The soak run's verdicts: what counts as a clean answer, and what counts as a leak."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from benchmarks.soak import Level, _judge

ANSWERS: dict[str, tuple[int, bytes, str]] = {
    "json-ok": (200, b'{"choices": [{}], "usage": {"completion_tokens": 4}}', "ok"),
    "json-error": (503, b'{"error": {"message": "busy"}}', "clean error"),
    "text-error": (502, b"upstream connect error", "unclean"),
    "error-without-object": (500, b'{"detail": "x"}', "unclean"),
    "json-broken": (200, b'{"choices": [', "unclean"),
    "json-incomplete": (200, b'{"choices": [{}]}', "unclean"),
    "stream-ok": (200, b'data: {"choices": []}\n\ndata: [DONE]\n\n', "ok"),
    "stream-error-event": (200, b'data: {"choices": []}\n\ndata: {"error": {}}\n\n', "clean error"),
    "stream-cut": (200, b'data: {"choices": []}\n\n', "unclean"),
    "stream-garbage": (200, b"data: {nope\n\ndata: [DONE]\n\n", "unclean"),
}


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    async def answer(request: web.Request) -> web.Response:
        status, body, _ = ANSWERS[request.match_info["name"]]
        return web.Response(status=status, body=body)

    app = web.Application()
    app.router.add_get("/{name}", answer)
    async with TestServer(app, host="127.0.0.1") as running:
        yield running


@pytest.mark.parametrize("name", sorted(ANSWERS))
async def test_every_answer_is_judged(server: TestServer, name: str) -> None:
    expected = ANSWERS[name][2]
    async with aiohttp.ClientSession() as session, session.get(server.make_url(f"/{name}")) as r:
        verdict = await _judge(r, stream=name.startswith("stream"))
    assert verdict.partition(": ")[0] == expected, verdict


BASE = Level(files=10, sockets=3, upstream=1, close_wait=0, tasks=4, open_work=0, rss=100 * 2**20)


def test_levels_at_the_baseline_are_no_leak() -> None:
    assert BASE.excess(BASE) == []
    assert Level(10, 4, 2, 0, 5, 0, 101 * 2**20).within(BASE)  # the scrape's connection


@pytest.mark.parametrize(
    ("after", "named"),
    [
        (Level(11, 3, 1, 0, 4, 0, 100 * 2**20), "open files"),
        (Level(10, 5, 1, 0, 4, 0, 100 * 2**20), "TCP connections"),
        (Level(10, 3, 3, 0, 4, 0, 100 * 2**20), "upstream connections"),
        (Level(10, 3, 1, 0, 6, 0, 100 * 2**20), "asyncio tasks"),
        (Level(10, 3, 1, 1, 4, 0, 100 * 2**20), "CLOSE_WAIT"),
        (Level(10, 3, 1, 0, 4, 0, 120 * 2**20), "memory"),
        (Level(10, 3, 1, 0, 4, 1, 100 * 2**20), "still open"),
    ],
)
def test_growth_past_the_slack_is_a_leak(after: Level, named: str) -> None:
    [found] = after.excess(BASE)
    assert named in found
