"""One engine's KV-event stream: a SUB socket, sequence checks, replay, index updates.

Messages are handled one at a time by one task, so an engine's events reach the index
in publish order even while a replay is in flight (the live socket queues meanwhile).
A gap is healed from the engine's replay socket (ROUTER: ``[b"", start seq]`` in,
``[b"", topic, seq, payload]`` out, ended by sequence -1); when that fails the engine's
entries are dropped, so the index under-reports rather than lies.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import zmq
import zmq.asyncio

from epp.kv_events.events import EventDecodeError, decode_batch
from epp.kv_events.index import KvBlockIndex
from epp.kv_events.sequencing import SeqAction, Sequencer

__all__ = ["END_SEQ", "EngineSubscriber", "StreamCounters"]

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass(slots=True)
class StreamCounters:
    """Totals over all engines; read by the metrics collector at scrape time."""

    messages: int = 0
    events: int = 0
    gaps: int = 0
    restarts: int = 0
    replays: int = 0
    replay_failures: int = 0
    dropped_engines: int = 0
    decode_errors: int = 0


class EngineSubscriber:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        engine: str,
        endpoint: str,
        replay_endpoint: str | None,
        topic_filter: bytes,
        index: KvBlockIndex,
        counters: StreamCounters,
        replay_timeout_s: float = 2.0,
    ) -> None:
        self.engine = engine
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self._ctx = ctx
        self._topic = topic_filter
        self._index = index
        self._counters = counters
        self._timeout = replay_timeout_s
        self.seq = Sequencer()

    async def run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        sub.connect(self.endpoint)
        log.info("kv events: subscribed to %s (%s)", self.endpoint, self.engine)
        try:
            while True:
                frames = await sub.recv_multipart()
                await self.on_message(frames)
        finally:
            sub.close(linger=0)

    async def on_message(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._counters.decode_errors += 1
            log.warning(
                "kv events from %s: malformed message (%d frames)", self.engine, len(frames)
            )
            return
        seq = int.from_bytes(frames[1], "big")
        action = self.seq.classify(seq)
        if action is SeqAction.DUPLICATE:
            return
        if action is SeqAction.RESTART:
            self._counters.restarts += 1
            log.info("kv events from %s: publisher restarted (seq %d)", self.engine, seq)
            self._index.clear(self.engine)
            self.seq.restart()
        elif action is SeqAction.FIRST and seq > 0 and self.replay_endpoint:
            # Joined a running engine: recover what its replay buffer still has.
            self._apply_replayed(0, await self._fetch(0))
        elif action is SeqAction.GAP:
            self._counters.gaps += 1
            last = self.seq.last
            start = 0 if last is None else last + 1
            log.info("kv events from %s: gap %d..%d", self.engine, start, seq - 1)
            got = await self._fetch(start) if self.replay_endpoint else []
            complete = bool(got) and got[0][0] <= start and got[-1][0] >= seq - 1
            if not complete:
                # Lost removals could make the index claim blocks the engine dropped.
                self._drop()
            self._apply_replayed(start, got)
        if self.seq.classify(seq) is SeqAction.DUPLICATE:
            return
        self._apply(seq, frames[2])

    def _drop(self) -> None:
        self._counters.dropped_engines += 1
        log.warning(
            "kv events from %s: missed events not recoverable; entries dropped", self.engine
        )
        self._index.clear(self.engine)

    def _apply(self, seq: int, payload: bytes) -> None:
        self._counters.messages += 1
        self.seq.accept(seq)
        try:
            batch = decode_batch(payload, token_ids=False)
        except EventDecodeError as exc:
            self._counters.decode_errors += 1
            log.warning("kv events from %s seq %d: %s; entries dropped", self.engine, seq, exc)
            self._index.clear(self.engine)
            return
        self._counters.events += len(batch.events)
        self._index.apply(self.engine, batch.events)

    async def _fetch(self, start: int) -> list[tuple[int, bytes]]:
        """The engine's buffered messages from ``start`` on, in order ([] on failure)."""
        assert self.replay_endpoint is not None
        self._counters.replays += 1
        got: list[tuple[int, bytes]] = []
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(self.replay_endpoint)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), self._timeout)
                if len(frames) != 4 or len(frames[2]) != 8:
                    raise ValueError(f"malformed replay message ({len(frames)} frames)")
                if frames[2] == END_SEQ:
                    break
                got.append((int.from_bytes(frames[2], "big"), frames[3]))
        except (TimeoutError, ValueError, zmq.ZMQError) as exc:
            self._counters.replay_failures += 1
            log.warning("kv events from %s: replay from %d failed: %s", self.engine, start, exc)
            return []
        finally:
            dealer.close(linger=0)
        got.sort(key=lambda item: item[0])
        return got

    def _apply_replayed(self, start: int, got: list[tuple[int, bytes]]) -> None:
        high = -1
        for seq, payload in got:
            if seq < start or seq <= high:
                continue
            self._apply(seq, payload)
            high = seq
        if high >= 0:
            self.seq.replayed(start, high)
