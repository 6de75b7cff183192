"""common.heap: run in a fresh interpreter, since it changes the process's collector."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from common.heap import YOUNG_THRESHOLD


def _run(code: str) -> dict[str, object]:
    script = textwrap.dedent(
        """
        import gc, json, weakref
        from common import heap
        """
    ) + textwrap.dedent(code)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout)


def test_settle_freezes_the_start_up_heap_and_raises_the_young_threshold() -> None:
    result = _run(
        """
        startup = [[] for _ in range(1000)]
        before = gc.get_threshold()
        heap.settle()
        print(json.dumps({"frozen": gc.get_freeze_count(), "before": before,
                          "after": gc.get_threshold()}))
        """
    )
    assert result["frozen"] >= 1000  # everything alive, the lists above included
    assert result["after"] == [YOUNG_THRESHOLD, *result["before"][1:]]


def test_settle_never_lowers_a_higher_threshold() -> None:
    result = _run(
        """
        gc.set_threshold(50_000, 10, 10)
        heap.settle()
        print(json.dumps({"after": gc.get_threshold()}))
        """
    )
    assert result["after"] == [50_000, 10, 10]


def test_cycles_made_after_settling_are_still_collected() -> None:
    result = _run(
        """
        heap.settle()

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        alive_before = gone() is not None  # a cycle: reference counting cannot free it
        gc.collect()
        print(json.dumps({"before": alive_before, "after": gone() is not None}))
        """
    )
    assert result == {"before": True, "after": False}
