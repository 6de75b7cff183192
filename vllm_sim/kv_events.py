"""KV-event publisher: what vLLM's ZeroMQ publisher sends, from the simulated cache.

Wire: PUB multipart ``[topic, 8-byte big-endian sequence, msgpack batch]`` where a batch
is ``[timestamp, [event, ...]]``; events in vLLM's map encoding (``{"type":
"BlockStored", ...}``) or the older tagged-array encoding. A ROUTER replay socket
answers ``[b"", 8-byte start]`` with every buffered message from that sequence on,
then ``[b"", b"", -1 (8 bytes, signed), b""]``.

The prefix cache hands events to ``add``; they are batched per event-loop turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any, Literal

import msgpack
import zmq
import zmq.asyncio

__all__ = ["KvEventPublisher", "all_cleared", "block_removed", "block_stored"]

log = logging.getLogger(__name__)

_END_SEQ = (-1).to_bytes(8, "big", signed=True)
Encoding = Literal["map", "array"]


def block_stored(
    hashes: list[bytes | int], parent: bytes | int | None, token_ids: list[int], block_size: int
) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": token_ids,
        "block_size": block_size,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }


def block_removed(hashes: list[bytes | int]) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}


def all_cleared() -> dict[str, Any]:
    return {"type": "AllBlocksCleared"}


def _as_array(event: dict[str, Any]) -> list[Any]:
    return [event["type"], *(v for k, v in event.items() if k != "type")]


def _int_hash(h: Any) -> Any:
    return int.from_bytes(h, "big") & ((1 << 64) - 1) if isinstance(h, bytes) else h


class KvEventPublisher:
    def __init__(
        self,
        host: str,
        port: int,
        replay_port: int | None,
        topic: str,
        *,
        encoding: Encoding = "map",
        int_hashes: bool = False,
        buffer_steps: int = 10_000,
    ) -> None:
        self.host = host
        self.port = port
        self.replay_port = replay_port
        self.topic = topic.encode("utf-8")
        self.encoding = encoding
        self.int_hashes = int_hashes
        self._ctx = zmq.asyncio.Context()
        self._pub: zmq.asyncio.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._pending: list[dict[str, Any]] = []
        self._seq = 0
        self.published = 0
        # Tests lose messages on purpose: buffered for replay but never sent live.
        self.drop_next = 0

    async def start(self) -> None:
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self.port = _bind(self._pub, self.host, self.port)
        if self.replay_port is not None:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self.replay_port = _bind(self._router, self.host, self.replay_port)
            self._replay_task = asyncio.create_task(self._serve_replay(), name="kv replay")

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        socks, self._pub, self._router = (self._pub, self._router), None, None
        for sock in socks:
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()

    def add(self, event: dict[str, Any]) -> None:
        """Queue one event; everything queued in this loop turn goes out as one batch."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(event)

    def flush(self) -> None:
        events, self._pending = self._pending, []
        if not events or self._pub is None:
            return
        if self.int_hashes:
            for ev in events:
                if "block_hashes" in ev:
                    ev["block_hashes"] = [_int_hash(h) for h in ev["block_hashes"]]
                if ev.get("parent_block_hash") is not None:
                    ev["parent_block_hash"] = _int_hash(ev["parent_block_hash"])
        wire: list[Any] = events if self.encoding == "map" else [_as_array(e) for e in events]
        payload = msgpack.packb([time.time(), wire], use_bin_type=True)
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        if self.drop_next > 0:
            self.drop_next -= 1
            return
        # No room at a slow subscriber: it sees a gap and replays.
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload], zmq.NOBLOCK)
        self.published += 1

    async def _serve_replay(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("invalid kv replay request (%d frames)", len(frames))
                continue
            client, _, start_bytes = frames
            start = int.from_bytes(start_bytes, "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await self._router.send_multipart(
                        [client, b"", self.topic, seq.to_bytes(8, "big"), payload]
                    )
            await self._router.send_multipart([client, b"", b"", _END_SEQ, b""])


def _bind(sock: zmq.asyncio.Socket, host: str, port: int) -> int:
    if port == 0:
        return int(sock.bind_to_random_port(f"tcp://{host}"))
    sock.bind(f"tcp://{host}:{port}")
    return port
