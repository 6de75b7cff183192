"""The upstream layer without sockets: a fake session stands in for aiohttp's.

``Upstream.fetch`` is where a stage's whole-answer exchange is sent, bounded in time and
size, and where aiohttp's failures become the sidecar's errors (retryable or not).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from typing import Any, cast

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import (
    EncodeError,
    EncodeTimeout,
    PrefillTimeout,
    PrefillUnavailable,
    SidecarError,
)
from sidecar.upstream import Retryable, StageErrors, Upstream

PREFILL = StageErrors(timeout=PrefillTimeout, failed=PrefillUnavailable)
ENCODE = StageErrors(
    timeout=lambda message: EncodeTimeout(message, "timeout"),
    failed=EncodeError,
    too_large_reason="too_large",
)


class FakeContent:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def is_eof(self) -> bool:
        return True

    def read_nowait(self, n: int = -1) -> bytes:
        body, self.body = self.body, b""
        return body


class FakeResponse:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
        self.content_length = len(body)
        self.content = FakeContent(body)
        self.released = False

    def release(self) -> None:
        self.released = True


class FakeSession:
    """Answers each request with the next scripted outcome (a response or an exception)."""

    def __init__(self, *outcomes: FakeResponse | BaseException | Callable[[], Any]) -> None:
        self.outcomes = list(outcomes)
        self.sent: list[tuple[str, str, bytes]] = []

    async def request(self, method: str, url: Any, *, data: bytes, **_: Any) -> FakeResponse:
        self.sent.append((method, str(url), data))
        outcome = self.outcomes.pop(0)
        if callable(outcome) and not isinstance(outcome, BaseException):
            return cast(FakeResponse, await outcome())
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def upstream(session: FakeSession, stale: list[str] | None = None) -> Upstream:
    seen = stale if stale is not None else []
    return Upstream("prefill", cast(aiohttp.ClientSession, session), seen.append)


async def fetch(up: Upstream, errors: StageErrors = PREFILL, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"limit": 1024, "timeout": 5.0} | kwargs
    return await up.fetch(
        "http://10.0.0.1:8000/v1/completions",
        CIMultiDict(),
        b"{}",
        target="10.0.0.1:8000",
        errors=errors,
        **options,
    )


async def test_an_answer_is_returned_whole_and_released() -> None:
    response = FakeResponse(200, b'{"ok":true}')
    session = FakeSession(response)
    answer = await fetch(upstream(session))
    assert (answer.status, answer.body) == (200, b'{"ok":true}')
    assert answer.content_type == "application/json"
    assert response.released
    assert session.sent == [("POST", "http://10.0.0.1:8000/v1/completions", b"{}")]


async def test_a_client_error_status_is_the_callers_to_judge() -> None:
    answer = await fetch(upstream(FakeSession(FakeResponse(400, b"no"))))
    assert answer.status == 400


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_retryable_statuses(status: int) -> None:
    with pytest.raises(Retryable) as raised:
        await fetch(upstream(FakeSession(FakeResponse(status, b""))))
    assert isinstance(raised.value.error, PrefillUnavailable)
    assert raised.value.error.reason == f"status_{status}"


async def test_unreachable_is_retryable() -> None:
    refused = aiohttp.ClientConnectorError(cast(Any, None), OSError(errno.ECONNREFUSED, "refused"))
    with pytest.raises(Retryable) as raised:
        await fetch(upstream(FakeSession(refused)))
    assert raised.value.error.reason == "connect"
    assert "unreachable" in raised.value.error.message


async def test_a_broken_answer_is_not_retried() -> None:
    with pytest.raises(PrefillUnavailable) as raised:
        await fetch(upstream(FakeSession(aiohttp.ClientPayloadError("cut"))))
    assert raised.value.reason == "protocol"


@pytest.mark.parametrize(("errors", "reason"), [(PREFILL, "protocol"), (ENCODE, "too_large")])
async def test_an_answer_over_the_limit(errors: StageErrors, reason: str) -> None:
    with pytest.raises(SidecarError) as raised:
        await fetch(upstream(FakeSession(FakeResponse(200, b"x" * 2048))), errors, limit=1024)
    assert raised.value.reason == reason


async def test_no_answer_in_time_is_the_stages_timeout() -> None:
    never = asyncio.Event()

    async def hang() -> FakeResponse:
        await never.wait()
        raise AssertionError("unreachable")

    with pytest.raises(PrefillTimeout) as raised:
        await fetch(upstream(FakeSession(hang)), timeout=0.05)
    assert "gave no answer within 0.05s" in raised.value.message


async def test_without_a_bound_a_connect_timeout_is_unreachable() -> None:
    with pytest.raises(Retryable) as raised:
        await fetch(
            upstream(FakeSession(aiohttp.ConnectionTimeoutError("connect"))), ENCODE, timeout=None
        )
    assert isinstance(raised.value.error, EncodeError)
    assert raised.value.error.reason == "connect"


async def test_a_stale_pooled_connection_is_resent_once() -> None:
    stale: list[str] = []
    session = FakeSession(aiohttp.ServerDisconnectedError(), FakeResponse(200, b"{}"))
    answer = await fetch(upstream(session, stale))
    assert answer.status == 200
    assert len(session.sent) == 2
    assert stale == ["prefill"]
