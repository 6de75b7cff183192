"""Every benchmark still imports: they run by hand, not in the suite, so a renamed name
they use would otherwise go unnoticed until someone runs them."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted(
    path.stem
    for path in (Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py")
    if not path.stem.startswith("_")
)


def test_the_benchmarks_are_found() -> None:
    assert {"sidecar_bench", "epp_cpu_bench", "routing_bench"} <= set(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_imports(name: str) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__doc__, f"benchmarks/{name}.py does not say what it measures"
