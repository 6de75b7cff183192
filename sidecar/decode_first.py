"""Decode-first attempts: did the decode engine decline before producing any output?

A pure scanner over the first bytes of a decode answer (JSON or SSE), so that a declined
attempt is dropped before the client sees a byte and an accepted one is relayed from its
first byte. Only OpenAI-shaped ``choices`` are read: anything else is accepted as is.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from common.json_codec import loads

__all__ = ["FinishScan", "Verdict"]


class Verdict(enum.Enum):
    PENDING = "pending"
    DECLINED = "declined"
    ACCEPTED = "accepted"


def _judge(payload: object, reason: str) -> Verdict:
    choices = payload.get("choices") if isinstance(payload, Mapping) else None
    if not isinstance(choices, list):
        return Verdict.PENDING
    for choice in choices:
        if not isinstance(choice, Mapping):
            continue
        finish = choice.get("finish_reason")
        if finish == reason:
            return Verdict.DECLINED
        if finish is not None:
            return Verdict.ACCEPTED
        delta = choice.get("delta")
        if choice.get("text") or (isinstance(delta, Mapping) and delta.get("content")):
            return Verdict.ACCEPTED
    return Verdict.PENDING


class FinishScan:
    """Feed the answer's bytes until the verdict is no longer PENDING.

    ``limit`` bounds what is held back: an answer that has not decided within that many
    bytes is accepted (a declining engine answers in a few hundred bytes).
    """

    def __init__(self, reason: str, *, sse: bool, limit: int = 256 * 1024) -> None:
        self.reason = reason
        self.sse = sse
        self.limit = limit
        self._buffer = bytearray()
        self._scanned = 0

    def feed(self, chunk: bytes) -> Verdict:
        self._buffer += chunk
        if self.sse:
            verdict = self._scan_events()
            if verdict is not Verdict.PENDING:
                return verdict
        return Verdict.ACCEPTED if len(self._buffer) > self.limit else Verdict.PENDING

    def end(self) -> Verdict:
        """The answer ended (no more bytes)."""
        if self.sse:
            self._buffer += b"\n\n"
            verdict = self._scan_events()
            return Verdict.ACCEPTED if verdict is Verdict.PENDING else verdict
        try:
            payload = loads(bytes(self._buffer))
        except ValueError:
            return Verdict.ACCEPTED
        verdict = _judge(payload, self.reason)
        return Verdict.ACCEPTED if verdict is Verdict.PENDING else verdict

    def _scan_events(self) -> Verdict:
        normalised = bytes(self._buffer).replace(b"\r\n", b"\n")
        while (end := normalised.find(b"\n\n", self._scanned)) >= 0:
            event = normalised[self._scanned : end]
            self._scanned = end + 2
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return Verdict.ACCEPTED
                try:
                    payload = loads(data)
                except ValueError:
                    return Verdict.ACCEPTED
                verdict = _judge(payload, self.reason)
                if verdict is not Verdict.PENDING:
                    return verdict
        return Verdict.PENDING
