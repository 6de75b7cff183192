"""Per-engine sequence tracking: what to do with the next message's sequence number.

Pure (no I/O): the subscriber asks ``Sequencer.classify`` and acts. A publisher numbers
its messages 0, 1, 2, ... from its start; a number below the last one seen means it
restarted (its cache is empty again), a jump means messages were lost (the replay
socket may still have them). Right after a replay the live stream may repeat numbers
the replay already delivered; those are duplicates, not a restart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["SeqAction", "Sequencer"]


class SeqAction(enum.Enum):
    FIRST = "first"  # first message seen: earlier history may be replayable
    NEXT = "next"  # in order
    GAP = "gap"  # numbers missing between the last seen and this one
    RESTART = "restart"  # the publisher started over
    DUPLICATE = "duplicate"  # already applied through a replay


@dataclass(slots=True)
class Sequencer:
    last: int | None = None
    # Numbers in [_dup_low, _dup_high] were applied through a replay.
    _dup_low: int = 0
    _dup_high: int = -1

    def classify(self, seq: int) -> SeqAction:
        last = self.last
        if last is None:
            return SeqAction.FIRST
        if seq == last + 1:
            return SeqAction.NEXT
        if seq > last:
            return SeqAction.GAP
        if self._dup_low <= seq <= self._dup_high:
            return SeqAction.DUPLICATE
        return SeqAction.RESTART

    def accept(self, seq: int) -> None:
        """``seq`` was applied (live or through a replay)."""
        if self.last is None or seq > self.last:
            self.last = seq
        if seq > self._dup_high:
            # The live stream has moved past what the replay delivered.
            self._dup_high = -1

    def replayed(self, low: int, high: int) -> None:
        """Messages ``low..high`` were applied through a replay."""
        self._dup_low, self._dup_high = low, high
        if self.last is None or high > self.last:
            self.last = high

    def restart(self) -> None:
        self.last = None
        self._dup_low, self._dup_high = 0, -1
