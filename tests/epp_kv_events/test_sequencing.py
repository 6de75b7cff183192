"""Sequence classification: first, in order, gaps, restarts, duplicates after a replay."""

from __future__ import annotations

from epp.kv_events import SeqAction, Sequencer


def test_first_next_gap_restart() -> None:
    s = Sequencer()
    assert s.classify(5) is SeqAction.FIRST
    s.accept(5)
    assert s.classify(6) is SeqAction.NEXT
    s.accept(6)
    assert s.classify(9) is SeqAction.GAP
    assert s.classify(0) is SeqAction.RESTART
    assert s.classify(6) is SeqAction.RESTART


def test_duplicates_after_replay_then_window_closes() -> None:
    s = Sequencer()
    s.accept(3)
    s.replayed(4, 8)
    assert s.last == 8
    assert s.classify(6) is SeqAction.DUPLICATE
    assert s.classify(9) is SeqAction.NEXT
    s.accept(9)
    assert s.classify(6) is SeqAction.RESTART
    s.restart()
    assert s.classify(0) is SeqAction.FIRST
