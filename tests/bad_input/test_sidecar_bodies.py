"""Malformed, huge and wrongly typed bodies at the sidecar: a clear 4xx, never a 5xx."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from tests.bad_input.conftest import BODY_LIMIT, PD, server_errors

pytestmark = [pytest.mark.bad_input, pytest.mark.asyncio(loop_scope="module")]

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello there"}]


def _request_errors(caplog: pytest.LogCaptureFixture, request_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if isinstance(r.msg, dict)
        and r.msg.get("event") == "request_error"
        and request_id in (r.msg.get("request_id"), r.msg.get("client_request_id"))
    ]


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"model": "sim-model",}', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),  # invalid UTF-8
        (b'{"model": "\xc3\x28"}', "not valid JSON"),  # invalid UTF-8 inside a string
        (b"null", "must be a JSON object"),
        (b"[]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"5", "must be a JSON object"),
        (b"[" * 5000 + b"]" * 5000, "nests too deeply"),
        (b'{"a":' * 3000 + b"1" + b"}" * 3000, "nests too deeply"),
    ],
    ids=[
        "empty",
        "truncated",
        "trailing-comma",
        "invalid-utf8",
        "invalid-utf8-in-string",
        "null",
        "array",
        "string",
        "number",
        "deep-array",
        "deep-object",
    ],
)
async def test_malformed_pd_body_is_400_with_the_request_id(
    pd: PD, caplog: pytest.LogCaptureFixture, raw: bytes, says: str
) -> None:
    headers = {**pd.route, "x-request-id": "bad-body-1", "content-type": "application/json"}
    async with asyncio.timeout(5):
        async with pd.session.post(f"{pd.url}{CHAT}", data=raw, headers=headers) as resp:
            status, answer = resp.status, await resp.json()
            assert resp.headers["x-request-id"] == "bad-body-1"
    assert status == 400
    assert answer["error"]["code"] == 400
    assert answer["error"]["stage"] == "request"
    assert answer["error"]["request_id"] == "bad-body-1"
    assert says in answer["error"]["message"]
    assert _request_errors(caplog, "bad-body-1"), "no log line names the request"
    assert (await pd.prefill.stats())["requests_total"] == 0
    assert (await pd.decode.stats())["requests_total"] == 0
    assert server_errors(caplog.records) == []
    await pd.healthy()


async def test_body_over_the_limit_is_413_before_it_is_read(
    pd: PD, caplog: pytest.LogCaptureFixture
) -> None:
    """A declared length over the limit is refused at once: nothing is buffered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", pd.port)
    try:
        head = (
            f"POST {CHAT} HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
            f"x-prefiller-host-port: {pd.prefill.host_port}\r\nx-request-id: huge-1\r\n"
            f"Content-Length: {1 << 40}\r\n\r\n"
        )
        writer.write(head.encode() + b'{"model": "sim-model", "prompt": "')
        await writer.drain()
        async with asyncio.timeout(5):
            status_line = await reader.readline()
            headers = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 413"), status_line
    assert b"application/json" in headers
    assert _request_errors(caplog, "huge-1")
    assert (await pd.prefill.stats())["requests_total"] == 0
    await pd.healthy()


async def test_chunked_body_over_the_limit_is_413(pd: PD, caplog: pytest.LogCaptureFixture) -> None:
    """No length announced: the limit holds while reading, the answer is still JSON."""

    async def chunks() -> Any:
        piece = b"x" * 8192
        for _ in range(4 * BODY_LIMIT // len(piece)):
            yield piece

    headers = {**pd.route, "content-type": "application/json"}
    before = pd.metric("pd_sidecar_requests_total", path=CHAT, mode="pd", status="413")
    async with asyncio.timeout(5):
        async with pd.session.post(f"{pd.url}{CHAT}", data=chunks(), headers=headers) as resp:
            status, answer = resp.status, await resp.json()
    assert status == 413
    assert answer["error"]["type"] == "invalid_request_error"
    assert str(BODY_LIMIT) in answer["error"]["message"]
    assert pd.metric("pd_sidecar_requests_total", path=CHAT, mode="pd", status="413") == before + 1
    assert (await pd.prefill.stats())["requests_total"] == 0
    assert server_errors(caplog.records) == []
    await pd.healthy()


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": MESSAGES, "max_tokens": 3, **fields}


@pytest.mark.parametrize(
    "body",
    [
        {"model": 5, "messages": MESSAGES},
        {"model": None, "messages": MESSAGES},
        {"model": "sim-model", "messages": "x"},
        {"model": "sim-model", "messages": [1, 2]},
        {"model": "sim-model", "messages": [{"role": 5, "content": {"a": 1}}]},
        _chat(max_tokens="ten"),
        _chat(max_tokens=-1),
        _chat(max_tokens=10**30),
        _chat(max_tokens=1.5),
        _chat(stream="yes"),
        _chat(stream=1),
        _chat(stream_options="x", stream=True),
        _chat(min_tokens="x"),
        _chat(max_completion_tokens={}),
        {"messages": MESSAGES},
        {},
    ],
    ids=lambda body: json.dumps(body, sort_keys=True)[:60],
)
async def test_wrong_types_in_known_fields_never_a_5xx(
    pd: PD, caplog: pytest.LogCaptureFixture, body: dict[str, Any]
) -> None:
    """The sidecar rewrites these fields on its legs; a wrong type must not crash it.

    The engine decides what it accepts: its own 4xx is relayed as is, or the request
    succeeds with the sidecar's rewrite.
    """
    async with asyncio.timeout(10):
        async with pd.session.post(f"{pd.url}{CHAT}", json=body, headers=pd.route) as resp:
            status, text = resp.status, await resp.text()
    assert status < 500, text
    if status >= 400:
        # The engine's own refusal, relayed verbatim (vLLM's error object, no sidecar stage).
        answer = json.loads(text)
        assert answer["error"]["code"] == status
        assert "stage" not in answer["error"]
    else:
        assert json.loads(text)["choices"]
    assert server_errors(caplog.records) == []
    await pd.healthy()


@pytest.mark.parametrize("value", [[], "x", {"do_remote_prefill": "maybe", "remote_port": "x"}])
@pytest.mark.parametrize("routed", [True, False], ids=["pd", "decode-only"])
async def test_client_transfer_params_of_any_shape_are_refused(
    pd: PD, caplog: pytest.LogCaptureFixture, value: Any, routed: bool
) -> None:
    headers = pd.route if routed else {}
    body = _chat(kv_transfer_params=value)
    async with asyncio.timeout(10):
        async with pd.session.post(f"{pd.url}{CHAT}", json=body, headers=headers) as resp:
            status, answer = resp.status, await resp.json()
    assert status == 400
    assert answer["error"]["param"] == "kv_transfer_params"
    assert (await pd.decode.stats())["requests_total"] == 0
    assert server_errors(caplog.records) == []


async def test_lone_surrogate_and_huge_integers_are_relayed_not_500(
    pd: PD, caplog: pytest.LogCaptureFixture
) -> None:
    """Valid JSON the fast serialiser refuses: a lone surrogate, integers beyond 64 bits,
    nesting deeper than 255 levels. Each used to come back as a 500 from the sidecar."""
    bodies = [
        b'{"model":"sim-model","messages":[{"role":"user","content":"a \\ud800 b"}]}',
        b'{"model":"sim-model","prompt":"hi","max_tokens":2,"seed":123456789012345678901234}',
        b'{"model":"sim-model","prompt":"hi","max_tokens":2,"x":' + b"[" * 300 + b"]" * 300 + b"}",
    ]
    for raw, path in zip(bodies, (CHAT, "/v1/completions", "/v1/completions"), strict=True):
        headers = {**pd.route, "content-type": "application/json"}
        async with asyncio.timeout(10):
            async with pd.session.post(f"{pd.url}{path}", data=raw, headers=headers) as resp:
                assert resp.status < 500, await resp.text()
    prefill_seen = (await pd.prefill.stats())["recorded"]
    assert prefill_seen and "\ud800" in prefill_seen[0]["body"]["messages"][0]["content"]
    assert server_errors(caplog.records) == []


async def test_local_and_passthrough_bad_bodies_are_the_engines_answer(
    pd: PD, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a prefill header the body is checked like any other: a 4xx, no 5xx."""
    for raw in (b"", b"{", b"\xff", b"[]", b'{"model": 5}'):
        async with asyncio.timeout(5):
            async with pd.session.post(
                f"{pd.url}{CHAT}", data=raw, headers={"content-type": "application/json"}
            ) as resp:
                assert 400 <= resp.status < 500, await resp.text()
    assert server_errors(caplog.records) == []
    await pd.healthy()


async def test_log_level_is_warning_for_refusals(pd: PD, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with pd.session.post(f"{pd.url}{CHAT}", data=b"{", headers=pd.route) as resp:
        assert resp.status == 400
        request_id = resp.headers["x-request-id"]
    [line] = [
        r
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == "request_error"
    ]
    assert line.levelno == logging.WARNING
    assert isinstance(line.msg, dict) and line.msg["request_id"] == request_id


async def test_compressed_request_bodies_are_not_decoded_by_the_sidecar(
    pd: PD, caplog: pytest.LogCaptureFixture
) -> None:
    """A generation body labelled gzip, P/D or decode-only: the sidecar must read it to
    check it, and reads plain JSON only (400). Other paths pass through with the bytes
    and their label untouched, so the engine decodes them itself. Decoding in the
    sidecar turned a false label into a 500 with tracebacks, and a true one into decoded
    bytes still labelled gzip."""
    import gzip

    body = json.dumps({"model": "sim-model", "prompt": "hi", "max_tokens": 2}).encode()
    for route in (pd.route, {}):
        for raw in (b"not gzip at all", gzip.compress(body)):
            headers = {**route, "content-type": "application/json", "content-encoding": "gzip"}
            url = f"{pd.url}/v1/completions"
            async with pd.session.post(url, data=raw, headers=headers) as resp:
                assert resp.status == 400, await resp.text()
                assert (await resp.json())["error"]["stage"] == "request"
    assert (await pd.decode.stats())["requests_total"] == 0
    # Passthrough: the engine gets exactly what the client sent, label included (the
    # simulator's server decodes it, as a gzip-aware engine would).
    async with pd.session.post(
        f"{pd.url}/tokenize",
        data=gzip.compress(body),
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["count"] == 1
    assert server_errors(caplog.records) == []
    await pd.healthy()


async def test_body_over_the_limit_is_413_on_every_generation_route(pd: PD) -> None:
    """--max-body-bytes bounds what the sidecar buffers: P/D bodies, and decode-only
    ones too, which are read to be checked before they go to the engine."""
    # Long words: over the byte limit, within the engine's context length.
    prompt = " ".join(["x" * 60] * (BODY_LIMIT // 50))
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": 1}
    assert len(json.dumps(body)) > BODY_LIMIT
    for route in ({}, pd.route):
        async with pd.session.post(f"{pd.url}/v1/completions", json=body, headers=route) as resp:
            assert resp.status == 413, await resp.text()
    assert (await pd.decode.stats())["requests_total"] == 0
