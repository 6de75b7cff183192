"""moriio without I/O: body translation, DP-rank choice, peer addresses, settings checks."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from sidecar.api_shapes import API_SHAPES
from sidecar.connectors import (
    ConnectorOptions,
    LegContext,
    LegOrder,
    MoriioOptions,
    PrefillResult,
    create_connector,
)
from sidecar.connectors._peers import PeerResolver
from sidecar.connectors.moriio import (
    DATA_PARALLEL_RANK,
    MoriioConnector,
    MoriioParallelConnector,
    decode_rank,
    pick_dp_rank,
)
from sidecar.errors import PrefillIncomplete
from sidecar.routing import HostPort
from sidecar.settings import SettingsError, load_settings

CHAT = "/v1/chat/completions"
BODY: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 50,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def _ctx(body: dict[str, Any] | None = None, request_id: str = "rid-1") -> LegContext:
    return LegContext(
        shape=API_SHAPES[CHAT],
        body=body if body is not None else dict(BODY),
        request_id=request_id,
        prefiller=HostPort("10.1.0.7", 8000),
        pairing=0x1234,
    )


def _connector(**moriio: Any) -> MoriioConnector:
    connector = create_connector("moriio", ConnectorOptions(moriio=MoriioOptions(**moriio)))
    assert isinstance(connector, MoriioConnector)
    return connector


WRITE = {
    "write_mode": True,
    "local_pod_ip": "10.2.0.9",
    "decode_notify_port": 61100,
    "decode_handshake_port": 6400,
    "prefill_notify_port": 61200,
    "prefill_handshake_port": 6500,
    "tp_size": 2,
}


def test_dp_rank_is_blake2s_of_the_request_id() -> None:
    digest = hashlib.blake2s(b"req-42").digest()
    assert pick_dp_rank("req-42", 8) == int.from_bytes(digest[:8], "big") % 8
    assert pick_dp_rank("req-42", 1) == 0
    ranks = {pick_dp_rank(f"r{i}", 4) for i in range(64)}
    assert ranks == {0, 1, 2, 3}  # spread over every rank


@pytest.mark.parametrize(
    ("returned", "used"),
    [(3, True), (3.0, True), (2.5, False), (8, False), (-1, False), (True, False),
     ("3", False), (None, False)],
)  # fmt: skip
def test_decode_rank_takes_a_valid_prefill_rank_else_the_hash(returned: Any, used: bool) -> None:
    rank, took = decode_rank({"remote_dp_rank": returned}, "rid", 8)
    assert took is used
    assert rank == (int(returned) if used else pick_dp_rank("rid", 8))
    assert decode_rank({"remote_dp_rank": 3}, "rid", 1) == (0, False)  # one rank: always 0
    assert decode_rank(None, "rid", 8) == (pick_dp_rank("rid", 8), False)


def test_read_mode_is_nixl_v2_plus_a_pinned_prefill_rank() -> None:
    connector = _connector(dp_size=4)
    assert connector.order is LegOrder.SEQUENTIAL
    ctx = _ctx()
    body = connector.prefill_body(ctx)
    assert body["kv_transfer_params"]["remote_host"] is None
    assert "transfer_id" not in body["kv_transfer_params"]
    assert connector.prefill_headers(ctx) == {DATA_PARALLEL_RANK: str(pick_dp_rank("rid-1", 4))}
    answer = {"remote_engine_id": "x", "remote_block_ids": [1]}
    decode = connector.decode_body(ctx, PrefillResult(transfer_params=answer))
    assert decode["kv_transfer_params"] == answer  # verbatim
    assert connector.decode_headers(ctx, PrefillResult(transfer_params=answer)) == {}
    assert _connector().prefill_headers(ctx) == {}  # one rank: no header


def test_serial_write_prefill_names_the_decode_pod() -> None:
    connector = _connector(**WRITE)
    ctx = _ctx()
    body = connector.prefill_body(ctx)
    ktp = body["kv_transfer_params"]
    assert ktp == {
        "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
        "remote_block_ids": None, "remote_host": "10.2.0.9", "remote_port": None,
        "remote_notify_port": 61100, "remote_dp_rank": 0, "remote_dp_rank_override": True,
        "remote_handshake_port": 6400, "transfer_id": "tx00000000-0000-4000-8000-000000001234",
        "tp_size": 2, "remote_dp_size": 1,
    }  # fmt: skip
    assert body["stream"] is False and "stream_options" not in body
    assert body["max_tokens"] == 1
    assert ctx.body == BODY  # untouched


def test_serial_write_decode_fills_in_what_the_prefill_left_out() -> None:
    connector = _connector(
        **WRITE, dp_size=4, dp_size_local=2, remote_hosts=("10.3.0.1", "10.3.0.2")
    )
    ctx = _ctx()
    answer = {"remote_engine_id": "p:1", "remote_dp_rank": 2, "remote_host": "10.1.0.7"}
    result = PrefillResult(transfer_params=answer)
    decode = connector.decode_body(ctx, result)
    assert decode["stream"] is True and decode["max_tokens"] == 50
    assert decode["kv_transfer_params"] == {
        "remote_engine_id": "p:1", "remote_host": "10.1.0.7",
        "remote_dp_rank": 2, "remote_dp_rank_override": True,
        "transfer_id": "tx00000000-0000-4000-8000-000000001234",
        "remote_notify_port": 61100, "remote_handshake_port": 6400, "remote_dp_size": 4,
        "remote_hosts": ["10.3.0.1", "10.3.0.2"], "remote_dp_size_local": 2,
    }  # fmt: skip
    assert connector.decode_headers(ctx, result) == {DATA_PARALLEL_RANK: "2"}
    # What the prefill sent is kept (the rank only when valid).
    kept = {"transfer_id": "txA", "remote_notify_port": 1, "remote_dp_rank": 9}
    params = connector.decode_body(ctx, PrefillResult(transfer_params=kept))["kv_transfer_params"]
    assert (params["transfer_id"], params["remote_notify_port"]) == ("txA", 1)
    assert params["remote_dp_rank"] == pick_dp_rank("rid-1", 4)
    assert answer == {"remote_engine_id": "p:1", "remote_dp_rank": 2, "remote_host": "10.1.0.7"}


def test_parallel_write_builds_the_decode_leg_from_the_flags() -> None:
    connector = _connector(**WRITE, parallel_dispatch=True, parallel_decode_wait_timeout=7.0)
    assert isinstance(connector, MoriioParallelConnector)
    assert connector.order is LegOrder.CONCURRENT and connector.commit_timeout == 7.0
    ctx = _ctx()
    prefill = connector.prefill_body(ctx)["kv_transfer_params"]
    decode = connector.decode_body(ctx, None)["kv_transfer_params"]
    assert prefill["transfer_id"] == decode["transfer_id"]
    assert decode == {
        "do_remote_prefill": True, "do_remote_decode": False,
        "remote_engine_id": "10.1.0.7:6500", "remote_block_ids": [],
        "remote_host": "10.1.0.7", "remote_port": 6500, "remote_notify_port": 61200,
        "remote_dp_rank": 0, "remote_dp_rank_override": True, "remote_handshake_port": 6500,
        "transfer_id": prefill["transfer_id"], "tp_size": 2, "remote_dp_size": 1,
    }  # fmt: skip


def test_parallel_read_prefill() -> None:
    connector = _connector(**WRITE, parallel_dispatch=True)
    ctx = _ctx()
    capped = {"choices": [{"finish_reason": "length"}]}
    assert connector.read_prefill(ctx, capped).generation_finished is False
    stopped = {"choices": [{"finish_reason": "stop"}]}
    assert connector.read_prefill(ctx, stopped).generation_finished is True
    with pytest.raises(PrefillIncomplete):
        connector.read_prefill(ctx, {"choices": []})


def test_wide_ep_hosts_on_both_legs() -> None:
    hosts = {"dp_size": 16, "dp_size_local": 8}
    connector = _connector(
        **WRITE, **hosts, parallel_dispatch=True,
        remote_hosts=("10.3.0.1", "10.3.0.2"), decode_hosts=("10.4.0.1", "10.4.0.2"),
    )  # fmt: skip
    ctx = _ctx()
    prefill = connector.prefill_body(ctx)["kv_transfer_params"]
    decode = connector.decode_body(ctx, None)["kv_transfer_params"]
    assert prefill["remote_hosts"] == ["10.4.0.1", "10.4.0.2"]  # the decode pods
    assert decode["remote_hosts"] == ["10.3.0.1", "10.3.0.2"]  # the prefill pods
    assert prefill["remote_dp_size_local"] == decode["remote_dp_size_local"] == 8
    rank = pick_dp_rank("rid-1", 16)
    assert prefill["remote_dp_rank"] == decode["remote_dp_rank"] == rank
    assert connector.decode_headers(ctx, None) == connector.prefill_headers(ctx)


async def test_peer_names_resolve_at_start_and_refresh_after_the_ttl() -> None:
    now = [0.0]
    resolver = PeerResolver(ttl=30.0, timeout=5.0, clock=lambda: now[0])
    resolver.seed(["localhost", "10.0.0.1", ""])
    seen: list[str] = []
    resolver.on_lookup = lambda: seen.append("lookup")
    resolver.on_change = lambda: seen.append("change")
    assert resolver.current("10.0.0.1") == "10.0.0.1"  # literal IPs as they are
    assert resolver.current("localhost") == "127.0.0.1"
    assert resolver.lookups == 0  # fresh: no lookup
    resolver._cache["localhost"] = ("10.9.9.9", 0.0)  # as if the pod had another IP
    now[0] = 31.0
    assert resolver.current("localhost") == "10.9.9.9"  # stale served at once...
    await asyncio.gather(*resolver._refreshing.values())
    assert resolver.current("localhost") == "127.0.0.1"  # ...and replaced in the background
    assert (resolver.lookups, resolver.changes) == (1, 1)
    assert seen == ["lookup", "change"]
    with pytest.raises(ValueError, match="cannot resolve"):
        resolver.seed(["no-such-host.invalid"])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--moriio-write-mode"], "--moriio-local-pod-ip"),
        (["--moriio-parallel-dispatch"], "requires --moriio-write-mode"),
        (["--kv-connector=sglang", "--moriio-dp-size=2"], "need --kv-connector=moriio"),
        (["--moriio-dp-size=16", "--moriio-remote-hosts=a,b"], "--moriio-dp-size-local"),
        (["--moriio-dp-size=12", "--moriio-dp-size-local=8", "--moriio-decode-hosts=a,b"],
         "divisible"),
        (["--moriio-dp-size=16", "--moriio-dp-size-local=4", "--moriio-remote-hosts=a,b"],
         "one host per pod"),
    ],
)  # fmt: skip
def test_moriio_settings_refused(argv: list[str], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        load_settings(argv, env={})


def test_moriio_settings_accepted() -> None:
    llmd = load_settings(
        ["--moriio-write-mode", "--moriio-parallel-dispatch", "--moriio-dp-size=16",
         "--moriio-dp-size-local=8", "--moriio-remote-hosts=a,b", "--moriio-decode-hosts=c,d",
         "--moriio-parallel-decode-wait-timeout=2s"],
        env={"POD_IP": "10.0.0.3", "MORIIO_DNS_RESOLVE_TTL_SECONDS": "7",
             "MORIIO_DNS_RESOLVE_TIMEOUT_SECONDS": "-1"},
    )  # fmt: skip
    assert llmd.kv_connector == "nixlv2" and llmd.effective_kv_connector == "moriio"
    assert llmd.moriio_pod_ip == "10.0.0.3"  # from POD_IP
    assert llmd.moriio_parallel_decode_wait_timeout == 2.0
    assert (llmd.moriio_dns_resolve_ttl, llmd.moriio_dns_resolve_timeout) == (7, 5.0)
    plain = load_settings([], env={})
    assert plain.effective_kv_connector == "nixlv2"
    assert load_settings(["--kv-connector=moriio"], env={}).effective_kv_connector == "moriio"


def test_an_unresolvable_pod_address_stops_start_up() -> None:
    with pytest.raises(ValueError, match=r"no-such-pod\.invalid"):
        _connector(**{**WRITE, "local_pod_ip": "no-such-pod.invalid"})
