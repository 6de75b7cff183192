"""The flow control model (the benchmark's workload against the real controller in
virtual time): strict priority and fairness show in its queue waits."""

from __future__ import annotations

from benchmarks._loadgen import percentile
from benchmarks.flow_control_model import model


async def test_critical_work_and_the_quiet_tenant_pass_the_flooding_tenants_backlog() -> None:
    waits = await model(8, 0.5, "round-robin", 60.0, 5)
    for w in waits.values():
        w.sort()
    critical, flood, quiet = waits["critical"], waits["standard/flood"], waits["standard/quiet"]
    assert len(critical) > 100 and len(quiet) > 50
    assert percentile(critical, 50) == 0.0, "a critical request mostly finds a kept slot"
    assert percentile(critical, 99) < 0.5
    assert percentile(flood, 50) > 5.0, "the flood's backlog waits for seconds"
    assert percentile(quiet, 50) < 0.5, "the quiet tenant does not wait behind it"
    assert len(waits["sheddable"]) < 0.05 * len(critical), "sheddable work is held back"


async def test_program_aware_fairness_lets_the_quiet_tenants_bursts_go_first() -> None:
    rr = sorted((await model(8, 0.5, "round-robin", 120.0, 5))["standard/quiet"])
    las = sorted((await model(8, 0.5, "program-aware", 120.0, 5))["standard/quiet"])
    assert percentile(las, 50) < percentile(rr, 50)
    assert percentile(las, 99) < percentile(rr, 99)


async def test_the_benchmarks_pool_keeps_critical_and_quiet_waits_short() -> None:
    """16 slots, holdback minCeiling 0.625 (the benchmark's default): a critical request
    almost never waits for a slot, and the quiet tenant's p99 wait is about half a
    request's service time (virtual time: deterministic)."""
    waits = await model(16, 0.625, "program-aware", 120.0, 5, service_s=0.55)
    critical = sorted(waits["critical"])
    quiet = sorted(waits["standard/quiet"])
    assert len(critical) > 500 and len(quiet) > 250
    assert percentile(critical, 99) < 0.05
    assert percentile(quiet, 99) < 0.6 * 0.55
    assert percentile(sorted(waits["standard/flood"]), 50) > 5.0
