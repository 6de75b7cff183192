"""The routing benchmark end to end, in about a minute: a four-engine fleet behind real
Envoy and the EPP, four configurations (least requests, precise prefix, two P/D)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.routing_bench import markdown_table, smoke

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(170)]


async def test_smoke_runs_every_configuration(tmp_path: Path) -> None:
    lines: list[str] = []
    results = await smoke(tmp_path, log=lines.append)
    by_name = {r.config: r for r in results}
    assert set(by_name) == {"least-requests", "precise-prefix", "pd", "pd-backlog"}
    for r in results:
        assert r.sent > 20, r
        assert r.errors == 0, r
        assert 0 < r.ttft_p50 <= r.ttft_p99 < 30, r
        assert r.itl_mean > 0, r
        assert 0 <= r.hit_rate <= 1, r
        # P/D's decode engines pull KV: the oracle covers prefills only.
        if not r.config.startswith("pd"):
            assert r.hit_rate <= r.oracle_hit_rate + 1e-9, r
        assert not math.isnan(r.decision_mean_ms), r
        # Every routed request's decision timed from the EPP's debug line.
        exact = r.extra["decision_exact_ms"]
        assert exact["n"] == r.sent, exact
        assert 0 < exact["p50"] <= exact["p99"] <= exact["max"], exact
        assert r.epp_cpu_ms_per_request > 0, r
        # Half the no-reuse capacity is offered: the engines compute prompts part time.
        assert 0 < r.busy < 1, r
        assert "epp_log_alarms" not in r.extra, r.extra
    # Precise routing reuses what the engines hold; the disaggregated run prefills.
    assert by_name["precise-prefix"].hit_rate > 0
    assert by_name["pd"].prefill_requests > 0
    # Each P/D configuration counts its own prefills (the fleet is reset between them).
    assert 0 < by_name["pd-backlog"].prefill_requests <= by_name["pd-backlog"].sent
    assert by_name["least-requests"].prefill_requests == 0
    table = markdown_table(results, 1.0)
    assert table.count("\n") == 2 + len(results)
    assert any("capacity" in line for line in lines)
