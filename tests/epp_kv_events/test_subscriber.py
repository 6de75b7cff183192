"""Subscribers against the simulator's publisher over real ZeroMQ sockets: live events,
gaps healed by replay or by dropping, restarts, late joins, purge on discovery removal."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import msgpack
import pytest

from epp.datastore import Endpoint
from epp.kv_events import KvBlockIndex, KvEventsPool
from epp.kv_events.subscriber import EngineSubscriber, StreamCounters
from tests.epp_kv_events.conftest import stored, wait_until
from vllm_sim.kv_events import KvEventPublisher, block_removed

StartPub = Callable[..., Awaitable[KvEventPublisher]]


def _pool(pub: KvEventPublisher, index: KvBlockIndex) -> tuple[KvEventsPool, Endpoint]:
    pool = KvEventsPool(
        index, port=pub.port, replay_port=pub.replay_port, topic_filter="kv@", replay_timeout_s=2
    )
    return pool, Endpoint("pod", "127.0.0.1", 8000)


async def _connected(pub: KvEventPublisher, index: KvBlockIndex, engine: str) -> None:
    """Publish a probe until it arrives (a SUB socket connects asynchronously)."""
    deadline = time.monotonic() + 5
    while not index.knows(engine):
        assert time.monotonic() < deadline, "subscriber never connected"
        pub.add(stored(999))
        pub.flush()
        await wait_until(lambda: True)
        try:
            await wait_until(lambda: index.knows(engine), timeout=0.05)
        except AssertionError:
            continue


@pytest.mark.parametrize("encoding", ["map", "array"])
@pytest.mark.parametrize("int_hashes", [False, True])
async def test_live_events_reach_the_index(
    publisher: StartPub, encoding: str, int_hashes: bool
) -> None:
    pub = await publisher(encoding=encoding, int_hashes=int_hashes)
    index = KvBlockIndex(1000)
    pool, ep = _pool(pub, index)
    pool.sync([ep], [])
    try:
        await _connected(pub, index, ep.key)
        pub.add(stored(1, 2, 3))
        pub.flush()
        await wait_until(lambda: index.match([1, 2, 3], [ep.key]) == {ep.key: 3})
        pub.add(block_removed([2]))
        pub.flush()
        await wait_until(lambda: index.match([1, 2, 3], [ep.key]) == {ep.key: 1})
        assert pool.counters.events >= 2
        assert pool.counters.gaps == 0
    finally:
        await pool.close()


async def test_gap_is_healed_by_replay(publisher: StartPub) -> None:
    pub = await publisher()
    index = KvBlockIndex(1000)
    pool, ep = _pool(pub, index)
    pool.sync([ep], [])
    try:
        await _connected(pub, index, ep.key)
        pub.drop_next = 1
        pub.add(stored(10))  # lost live, still in the replay buffer
        pub.flush()
        pub.add(stored(11))
        pub.flush()
        await wait_until(lambda: index.match([11], [ep.key]) == {ep.key: 1})
        assert index.match([10], [ep.key]) == {ep.key: 1}
        assert index.match([999], [ep.key]) == {ep.key: 1}  # nothing dropped
        assert pool.counters.gaps == 1
        assert pool.counters.replays >= 1
        assert pool.counters.dropped_engines == 0
    finally:
        await pool.close()


async def test_gap_without_replay_drops_the_engines_entries(publisher: StartPub) -> None:
    pub = await publisher(replay=False)
    index = KvBlockIndex(1000)
    pool, ep = _pool(pub, index)
    pool.sync([ep], [])
    try:
        await _connected(pub, index, ep.key)
        pub.drop_next = 1
        pub.add(block_removed([999]))  # lost: the index must not keep claiming 999 blindly
        pub.flush()
        pub.add(stored(11))
        pub.flush()
        await wait_until(lambda: index.match([11], [ep.key]) == {ep.key: 1})
        assert index.match([999], [ep.key]) == {}
        assert pool.counters.gaps == 1
        assert pool.counters.dropped_engines == 1
    finally:
        await pool.close()


async def test_late_join_recovers_history_through_replay(publisher: StartPub) -> None:
    pub = await publisher()
    for h in (1, 2, 3):
        pub.add(stored(h))
        pub.flush()  # nobody listens yet: only the replay buffer has these
    index = KvBlockIndex(1000)
    pool, ep = _pool(pub, index)
    pool.sync([ep], [])
    try:
        await _connected(pub, index, ep.key)
        await wait_until(lambda: index.match([1], [ep.key]) == {ep.key: 1})
        assert index.match([2], [ep.key]) == {ep.key: 1}
        assert index.match([3], [ep.key]) == {ep.key: 1}
    finally:
        await pool.close()


async def test_removed_endpoint_is_purged(publisher: StartPub) -> None:
    pub = await publisher()
    index = KvBlockIndex(1000)
    pool, ep = _pool(pub, index)
    pool.sync([ep], [])
    try:
        await _connected(pub, index, ep.key)
        pool.sync([], [ep])
        assert not index.knows(ep.key)
        assert pool.subscribed() == []
    finally:
        await pool.close()


def _frames(seq: int, events: list[object]) -> list[bytes]:
    payload = msgpack.packb([0.0, events], use_bin_type=True)
    return [b"kv@pod@m", seq.to_bytes(8, "big"), payload]


async def test_restart_clears_then_applies() -> None:
    index = KvBlockIndex(100)
    counters = StreamCounters()
    sub = EngineSubscriber(None, "e", "tcp://x", None, b"", index, counters)  # type: ignore[arg-type]
    await sub.on_message(_frames(0, [stored(1)]))
    await sub.on_message(_frames(1, [stored(2)]))
    assert index.match([1, 2], ["e"]) == {"e": 2}
    await sub.on_message(_frames(0, [stored(5)]))  # the engine started over
    assert counters.restarts == 1
    assert index.match([1], ["e"]) == {}
    assert index.match([5], ["e"]) == {"e": 1}


async def test_malformed_messages_are_counted_not_fatal() -> None:
    index = KvBlockIndex(100)
    counters = StreamCounters()
    sub = EngineSubscriber(None, "e", "tcp://x", None, b"", index, counters)  # type: ignore[arg-type]
    await sub.on_message(_frames(0, [stored(1)]))
    await sub.on_message([b"only one frame"])
    await sub.on_message([b"t", (1).to_bytes(8, "big"), b"\xc1"])
    assert counters.decode_errors == 2
    assert index.match([1], ["e"]) == {}  # unknown state after a bad batch: dropped
    await sub.on_message(_frames(2, [stored(3)]))
    assert index.match([3], ["e"]) == {"e": 1}


def test_endpoint_template() -> None:
    pool = KvEventsPool(KvBlockIndex(1), port=5557, replay_port=5558)
    assert pool.endpoint(Endpoint("p", "10.0.0.1", 8000), 5557) == "tcp://10.0.0.1:5557"
    assert pool.endpoint(Endpoint("p", "fd00::1", 8000), 5558) == "tcp://[fd00::1]:5558"
    ipc = KvEventsPool(KvBlockIndex(1), port=1, endpoint_template="ipc:///run/{name}-{port}")
    assert ipc.endpoint(Endpoint("pod-a", "10.0.0.1", 8000), 1) == "ipc:///run/pod-a-1"
