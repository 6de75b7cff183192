"""Property-based bodies (hypothesis) at both services: never a 5xx of our own making,
never a traceback in the logs.

Examples are derandomized (the same on every run) and counts are modest, so the whole
module stays within a few seconds. A 5xx relayed verbatim from an engine carries the
engine's error object (no ``stage``); one the sidecar produced carries its ``stage``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.bad_input.conftest import PD, Epp, server_errors

pytestmark = [pytest.mark.bad_input, pytest.mark.asyncio(loop_scope="module")]

_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/inference/v1/generate",
)

# Text with everything JSON can carry, with a bias towards what breaks encoders: lone
# surrogates (sent as \udXXX escapes), control characters, quotes and backslashes.
_char = (
    st.characters(exclude_categories=())
    | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
    | st.sampled_from('\x00\r\n\t"\\\u2028\ufeff')
)
# Joined by hand: st.text() leaves out lone surrogates whatever its alphabet says.
_text = st.lists(_char, max_size=12).map("".join)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=10,
)
_part = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["text", "image_url", "input_audio", "input_image", "image", "tool_result", 5, None]
        )
    },
    optional={
        "text": _text | _json,
        "image_url": st.fixed_dictionaries({"url": _text}) | _json,
        "input_audio": st.fixed_dictionaries({"data": _text}) | _json,
        "source": st.fixed_dictionaries({"data": _text}) | _json,
    },
)
_content = _text | st.lists(_part, max_size=3) | _json
_message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "system", "assistant"]) | _json,
        "content": _content,
    },
)
_int_ish = st.integers(min_value=-2, max_value=2**66) | _json
_fields: dict[str, st.SearchStrategy[Any]] = {
    "model": st.just("sim-model") | _json,
    "messages": st.lists(_message, max_size=3) | _json,
    "prompt": _text | st.lists(st.integers(0, 2**40), max_size=4) | _json,
    "input": _text | st.lists(_message, max_size=2) | _json,
    "instructions": _text | _json,
    "system": _text | st.lists(_part, max_size=2) | _json,
    "token_ids": st.lists(st.integers(0, 2**40), max_size=4) | _json,
    "sampling_params": st.fixed_dictionaries({}, optional={"max_tokens": _int_ish}) | _json,
    "max_tokens": _int_ish,
    "max_completion_tokens": _int_ish,
    "max_output_tokens": _int_ish,
    "min_tokens": _int_ish,
    "stream": st.booleans() | _json,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | _json,
    "kv_transfer_params": _json,
    "n": _int_ish,
}
_request_body = st.fixed_dictionaries({}, optional=_fields)

_small = st.integers(min_value=1, max_value=4)
_extras = st.fixed_dictionaries(
    {},
    optional={
        name: _fields[name]
        for name in (
            "kv_transfer_params",
            "stream_options",
            "min_tokens",
            "n",
            "max_completion_tokens",
        )
    },
)
_user_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system"]), "content": _text | st.lists(_part, max_size=2)}
)
_SKELETONS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "/v1/chat/completions": st.fixed_dictionaries(
        {"messages": st.lists(_user_message, min_size=1, max_size=2), "max_tokens": _small}
    ),
    "/v1/completions": st.fixed_dictionaries(
        {
            "prompt": _text | st.lists(st.integers(0, 50_000), min_size=1, max_size=4),
            "max_tokens": _small,
        }
    ),
    "/v1/responses": st.fixed_dictionaries({"input": _text, "max_output_tokens": _small}),
    "/v1/messages": st.fixed_dictionaries(
        {"messages": st.lists(_user_message, min_size=1, max_size=2), "max_tokens": _small}
    ),
    "/inference/v1/generate": st.fixed_dictionaries(
        {
            "token_ids": st.lists(st.integers(0, 50_000), min_size=1, max_size=4),
            "sampling_params": st.fixed_dictionaries({"max_tokens": _small}),
        }
    ),
}


def _plausible(path: str) -> st.SearchStrategy[dict[str, Any]]:
    """Nearly valid requests (so they reach the engines) with hostile text and extras."""
    return st.tuples(_SKELETONS[path], _extras, st.booleans()).map(
        lambda parts: {"model": "sim-model", "stream": parts[2], **parts[1], **parts[0]}
    )


_path_and_plausible = st.sampled_from(PATHS).flatmap(
    lambda path: st.tuples(st.just(path), _plausible(path))
)


def _encode(body: Any) -> bytes:
    # ensure_ascii: lone surrogates travel as escapes, the way a client can send them.
    return json.dumps(body).encode()


_raw = (
    st.binary(max_size=200)
    | _request_body.map(_encode).flatmap(
        lambda raw: st.tuples(st.integers(0, len(raw)), st.binary(min_size=1, max_size=3)).map(
            lambda cut: raw[: cut[0]] + cut[1] + raw[cut[0] :]
        )
    )
    | _json.map(_encode)
)


def _own_5xx(status: int, text: str) -> bool:
    """A 5xx the sidecar produced (its errors name a stage), not an engine's relayed one."""
    if status < 500:
        return False
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return True  # not the engine's JSON error object either
    return isinstance(error, dict) and "stage" in error


async def _send_to_sidecar(pd: PD, path: str, raw: bytes, pd_route: bool) -> tuple[int, str]:
    headers = {"content-type": "application/json", **(pd.route if pd_route else {})}
    async with asyncio.timeout(10):
        async with pd.session.post(f"{pd.url}{path}", data=raw, headers=headers) as resp:
            return resp.status, await resp.text()


@_SETTINGS
@given(path=st.sampled_from(PATHS), body=_request_body, pd_route=st.booleans())
async def test_sidecar_request_shaped_bodies(
    pd: PD, caplog: pytest.LogCaptureFixture, path: str, body: dict[str, Any], pd_route: bool
) -> None:
    status, text = await _send_to_sidecar(pd, path, _encode(body), pd_route)
    assert not _own_5xx(status, text), (status, text)
    assert status < 500, (status, text)  # the engines do not fail on these either
    assert server_errors(caplog.records) == []


@_SETTINGS
@given(request=_path_and_plausible)
async def test_sidecar_plausible_pd_bodies(
    pd: PD, caplog: pytest.LogCaptureFixture, request: tuple[str, dict[str, Any]]
) -> None:
    """Nearly valid requests take the whole P/D path: both legs, rewritten bodies."""
    path, body = request
    status, text = await _send_to_sidecar(pd, path, _encode(body), pd_route=True)
    assert not _own_5xx(status, text), (status, text)
    assert status < 500, (status, text)
    assert server_errors(caplog.records) == []


@_SETTINGS
@given(path=st.sampled_from(PATHS), raw=_raw)
async def test_sidecar_raw_bytes(
    pd: PD, caplog: pytest.LogCaptureFixture, path: str, raw: bytes
) -> None:
    status, text = await _send_to_sidecar(pd, path, raw, pd_route=True)
    assert status < 500, (status, text)
    assert server_errors(caplog.records) == []


async def test_sidecar_healthy_after_fuzzing(pd: PD) -> None:
    await pd.healthy()


@settings(_SETTINGS, max_examples=100)
@given(path=st.sampled_from(PATHS), body=_request_body)
async def test_epp_request_shaped_bodies(
    epp: Epp, caplog: pytest.LogCaptureFixture, path: str, body: dict[str, Any]
) -> None:
    answer = await epp.ask(_encode(body), path=path)
    if answer.kind == "immediate_response":
        assert answer.status < 500, answer.body
        assert answer.error()["code"] == answer.status
    else:
        assert answer.kind == "request_headers"
    assert server_errors(caplog.records) == []


@_SETTINGS
@given(request=_path_and_plausible)
async def test_epp_plausible_bodies(
    epp: Epp, caplog: pytest.LogCaptureFixture, request: tuple[str, dict[str, Any]]
) -> None:
    path, body = request
    answer = await epp.ask(_encode(body), path=path)
    assert answer.status < 500, answer.body
    assert server_errors(caplog.records) == []


@settings(_SETTINGS, max_examples=80)
@given(path=st.sampled_from(PATHS), raw=_raw)
async def test_epp_raw_bytes(
    epp: Epp, caplog: pytest.LogCaptureFixture, path: str, raw: bytes
) -> None:
    answer = await epp.ask(raw, path=path)
    assert answer.status < 500, answer.body
    assert server_errors(caplog.records) == []


async def test_epp_metrics_scrapable_after_fuzzing(epp: Epp) -> None:
    assert await epp.metrics_scrape() == 200
