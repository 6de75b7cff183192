"""Bad input at the EPP: its ext_proc service driven directly, and through real Envoy."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from epp.extproc import ROUTING_HEADERS
from epp.extproc.headers import GATEWAY_HEADERS
from tests.bad_input.conftest import BODY_LIMIT, Epp, Gateway, server_errors

pytestmark = [pytest.mark.bad_input, pytest.mark.asyncio(loop_scope="module")]

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello"}]


def _routed(answer: Any) -> dict[str, str]:
    """The routing headers an answer sets (name -> value); fails on a refusal."""
    assert answer.kind in ("request_headers", "request_body"), (answer.status, answer.body)
    response = answer.response
    common = getattr(response, answer.kind).response
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"", "empty request body"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b'{"model": "\xc3\x28", "messages": []}', "not valid JSON"),
        (b"null", "must be a JSON object"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"x"', "must be a JSON object"),
        (b"[" * 30_000 + b"]" * 30_000, "nests too deeply"),
        (b'{"model": 5, "messages": []}', "'model' must be a string"),
        (b'{"model": "m", "messages": "x"}', "'messages' must be a list"),
        (b'{"model": "m", "messages": [5]}', "messages[0] must be an object"),
        (b'{"model": "m", "messages": [{"role": 1}]}', "messages[0].role"),
        (b'{"model": "m", "messages": [{"content": {}}]}', "string or a list of parts"),
        (b'{"model": "m"}', "missing required field 'messages'"),
        (b'{"messages": []}', "missing required field 'model'"),
        (b'{"model": "\\ud800", "messages": []}', "not valid Unicode"),
    ],
)
async def test_malformed_bodies_are_refused_with_400(
    epp: Epp, caplog: pytest.LogCaptureFixture, raw: bytes, says: str
) -> None:
    caplog.set_level(logging.INFO)
    before = epp.errors(400)
    async with asyncio.timeout(5):
        answer = await epp.ask(raw, headers=[("x-request-id", "epp-bad-1")])
    assert answer.kind == "immediate_response"
    assert answer.status == 400
    error = answer.error()
    assert error["code"] == 400 and error["type"] == "bad_request"
    assert says in error["message"]
    assert epp.errors(400) == before + 1
    assert any("epp-bad-1" in r.getMessage() for r in caplog.records)
    assert server_errors(caplog.records) == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "m", "prompt": 5}),
        ("/v1/completions", {"model": "m", "prompt": [1.5, "x"]}),
        ("/v1/completions", {"model": "m", "prompt": [[1, 2], [2**70]]}),
        ("/v1/responses", {"model": "m", "input": 5}),
        ("/v1/responses", {"model": "m", "input": "x", "instructions": 5}),
        ("/v1/messages", {"model": "m", "system": 5, "messages": MESSAGES}),
        ("/inference/v1/generate", {"token_ids": "x"}),
        ("/inference/v1/generate", {"token_ids": [None]}),
        (CHAT, {"model": "m", "messages": [{"role": "u", "content": [{"type": 5}]}]}),
        (CHAT, {"model": "m", "messages": [{"role": "u", "content": [{"type": "image_url"}]}]}),
        ("/v1/embeddings", {"model": "m"}),
        ("/v1/images/generations", {"prompt": 5}),
    ],
)
async def test_wrong_types_per_api_are_400(
    epp: Epp, caplog: pytest.LogCaptureFixture, path: str, body: dict[str, Any]
) -> None:
    answer = await epp.ask(json.dumps(body).encode(), path=path)
    assert answer.kind == "immediate_response", answer
    assert answer.status == 400, answer.body
    assert server_errors(caplog.records) == []


async def test_a_path_no_parser_claims_is_routed_unread(epp: Epp) -> None:
    """llm-d's default parsers end with passthrough: the body is not read at all."""
    answer = await epp.ask(b"\xff not json", path="/v1/unknown")
    routed = _routed(answer)
    assert routed["x-gateway-destination-endpoint"] == epp.decode.host_port
    assert "x-prefiller-host-port" not in routed


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": MESSAGES, "stream": "yes", "max_tokens": "ten"},
        {"model": "m", "messages": MESSAGES, "kv_transfer_params": []},
        {"model": "m", "messages": [{"role": "user", "content": "a \ud800 b"}]},
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": "\ud800"}},
                        {"type": "image_url", "image_url": {"url": "data:" + "a" * 300 + "\ud800"}},
                    ],
                }
            ],
        },
    ],
    ids=["engine-fields", "kv-params", "surrogate-text", "surrogate-media"],
)
async def test_fields_the_epp_does_not_read_are_routed_unchanged(
    epp: Epp, caplog: pytest.LogCaptureFixture, body: dict[str, Any]
) -> None:
    """Sampling fields are the engine's to judge; lone surrogates (valid JSON escapes)
    in text or inline media used to be a 500 and a /metrics that failed for good."""
    raw = json.dumps(body).encode()
    answer = await epp.ask(raw)
    assert _routed(answer)["x-gateway-destination-endpoint"] == epp.decode.host_port
    assert await epp.metrics_scrape() == 200
    assert server_errors(caplog.records) == []


async def test_lone_surrogate_model_name_keeps_metrics_scrapable(epp: Epp) -> None:
    answer = await epp.ask(b'{"model": "bad \\udc80 name", "messages": []}')
    assert answer.status == 400
    assert await epp.metrics_scrape() == 200


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
async def test_body_over_the_limit_is_413(
    epp: Epp, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    before = epp.errors(413)
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"a" * BODY_LIMIT + b'"}]}'
    async with asyncio.timeout(5):
        answer = await epp.ask(raw, chunk=8192, mode=mode)
    assert answer.status == 413
    assert str(BODY_LIMIT) in answer.error()["message"]
    assert epp.errors(413) == before + 1
    assert server_errors(caplog.records) == []


async def test_client_routing_headers_are_all_overwritten_or_removed(epp: Epp) -> None:
    """Whatever routing headers the client sent, the answer sets the EPP's own values
    (overwriting) and removes every other routing header."""
    spoofed = [(name, "169.254.169.254:80") for name in ROUTING_HEADERS]
    answer = await epp.ask(
        json.dumps({"model": "m", "messages": MESSAGES}).encode(), headers=spoofed
    )
    routed = _routed(answer)
    assert routed == {
        "x-gateway-destination-endpoint": epp.decode.host_port,
        "x-prefiller-host-port": epp.prefill.host_port,
        "content-length": str(len(json.dumps({"model": "m", "messages": MESSAGES}))),
    }
    assert answer.response is not None
    common = answer.response.request_headers.response
    assert all(
        h.append_action == h.OVERWRITE_IF_EXISTS_OR_ADD for h in common.header_mutation.set_headers
    )
    owned = {*ROUTING_HEADERS, *GATEWAY_HEADERS}
    assert set(common.header_mutation.remove_headers) == owned - set(routed)


async def test_thousands_of_subset_hint_targets_are_bounded(
    epp: Epp, caplog: pytest.LogCaptureFixture
) -> None:
    """A subset hint listing 20,000 endpoints is matched in linear time; the one real
    endpoint in it is picked."""
    from tests.epp_gateway.fakes import ExtProcClient, request_body, request_headers

    hint = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:8000" for i in range(20_000)]
    hint.append(epp.decode.host_port)
    client = ExtProcClient(epp.channel)
    started = time.perf_counter()
    try:
        message = request_headers(CHAT, subset=hint)
        await client.send(message, request_body(b'{"model":"m","messages":[]}', end_of_stream=True))
        response = await client.recv()
    finally:
        client.call.cancel()
    assert time.perf_counter() - started < 2.0
    assert response.WhichOneof("response") == "request_headers", response
    assert server_errors(caplog.records) == []


async def test_control_characters_in_header_values_do_not_break_the_epp(
    epp: Epp, caplog: pytest.LogCaptureFixture
) -> None:
    """Envoy refuses these before ext_proc; driven directly, the EPP still routes."""
    answer = await epp.ask(
        json.dumps({"model": "m", "messages": MESSAGES}).encode(),
        headers=[("x-request-id", "a\r\nb\x00"), ("x-prefiller-host-port", "x\r\ny:1")],
    )
    assert _routed(answer)["x-prefiller-host-port"] == epp.prefill.host_port
    assert server_errors(caplog.records) == []


async def test_protocol_abuse_ends_only_that_stream(
    epp: Epp, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages out of order (a body before headers, headers twice) end the stream with
    INVALID_ARGUMENT; the next stream is served."""
    import grpc

    from tests.epp_gateway.fakes import ExtProcClient, request_body, request_headers

    for messages in (
        [request_body(b"{}", end_of_stream=True)],
        [request_headers(CHAT), request_headers(CHAT)],
        [ep.ProcessingRequest()],
    ):
        client = ExtProcClient(epp.channel)
        await client.send(*messages)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await asyncio.wait_for(client.call.read(), 5)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    answer = await epp.ask(json.dumps({"model": "m", "messages": MESSAGES}).encode())
    assert _routed(answer)
    assert server_errors(caplog.records) == []


# -- through real Envoy -----------------------------------------------------------------


@pytest.mark.envoy
async def test_gateway_overwrites_spoofed_routing_headers(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Every routing header a client sends, each twice (the prefill one also as a
    2000-target list), is replaced by the EPP's single value or removed before the pod
    sees the request."""
    from multidict import CIMultiDict

    epp = gateway.epp
    epp.decode.requests.clear()
    spoofed: CIMultiDict[str] = CIMultiDict()
    for name in ROUTING_HEADERS:
        spoofed.add(name, "169.254.169.254:80")
        spoofed.add(name, "10.0.0.1:80")
    spoofed.add("x-prefiller-host-port", ",".join(f"h{i}:80" for i in range(2000)))
    body = {"model": "m", "messages": MESSAGES}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gateway.url}{CHAT}", json=body, headers=spoofed) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["pod"] == "d"
    [seen] = epp.decode.requests
    assert seen.headers["x-gateway-destination-endpoint"] == [epp.decode.host_port]
    assert seen.headers["x-prefiller-host-port"] == [epp.prefill.host_port]
    for name in set(ROUTING_HEADERS) - {"x-gateway-destination-endpoint", "x-prefiller-host-port"}:
        assert name not in seen.headers, name
    assert epp.prefill.requests == []
    assert server_errors(caplog.records) == []


@pytest.mark.envoy
async def test_gateway_refuses_header_injection_before_the_epp(gateway: Gateway) -> None:
    epp = gateway.epp
    epp.decode.requests.clear()
    answers = []
    lines = [
        b"x-request-id: a\rX-Injected: 1",
        b"x-request-id: a\nX-Injected: 1",
        b"x-prefiller-host-port: a\x00b:1",
        b"x-prefiller-host-port: " + b"h:1," * 20_000,  # over Envoy's 60 KiB of headers
    ]
    for line in lines:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(
            b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: gw\r\n" + line
            + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )  # fmt: skip
        await writer.drain()
        try:
            async with asyncio.timeout(5):
                answer = await reader.read()
        except ConnectionResetError:  # closed with our bytes unread: a reset, not a FIN
            answer = b""
        writer.close()
        answers.append(answer.partition(b"\r\n")[0])
        assert b"x-injected" not in answer.lower()
    # Envoy answers a bare CR or LF with 400, and closes on a NUL or oversized headers.
    assert answers == [b"HTTP/1.1 400 Bad Request"] * 2 + [b""] * 2, answers
    assert epp.decode.requests == []


@pytest.mark.envoy
async def test_gateway_answers_bad_bodies_with_the_epps_json_error(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        for raw, status in ((b"{", 400), (b"\xff", 400), (b"x" * (BODY_LIMIT + 1), 413)):
            async with session.post(
                f"{gateway.url}{CHAT}", data=raw, headers={"content-type": "application/json"}
            ) as resp:
                assert resp.status == status, await resp.text()
                answer = await resp.json()
                assert answer["error"]["code"] == status
