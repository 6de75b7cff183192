"""``benchmarks/sidecar_instructions.py`` end to end: the sidecar under callgrind in front
of the fake engines, a count per request that is stable from run to run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.sidecar_instructions import main

pytestmark = pytest.mark.timeout(600)

_COUNT = re.compile(r"^(pd-sidecar(?:@base)?): ([0-9,]+) instructions per request", re.M)


def test_counts_the_same_tree_the_same(capsys: pytest.CaptureFixture[str]) -> None:
    # The baseline is this tree too: the two counts may differ only by the noise of a
    # few timers and retries, far under a percent.
    tree = Path(__file__).resolve().parents[2]
    args = ["--requests", "60", "--warmup", "20", "--concurrency", "4"]
    assert main([*args, "--baseline-src", str(tree)]) == 0
    counts = {name: int(n.replace(",", "")) for name, n in _COUNT.findall(capsys.readouterr().out)}
    assert set(counts) == {"pd-sidecar", "pd-sidecar@base"}
    # A P/D request through the sidecar is hundreds of thousands of instructions.
    assert 100_000 < counts["pd-sidecar"] < 5_000_000, counts
    assert abs(counts["pd-sidecar"] / counts["pd-sidecar@base"] - 1) < 0.03, counts
