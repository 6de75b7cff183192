"""Real-vLLM end-to-end fixtures, and the switch that keeps them out of the fast suite.

Tests here run only when ``DISAGG_VLLM_PYTHON`` names the python of the vLLM CPU
environment (``./dev e2e`` builds it with ``scripts/vllm-cpu-env`` and sets it);
otherwise they are skipped.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from examples.local_stack import LocalStack, StackOptions

from .engines import KV_TRANSFER_CONFIG, VllmEngine, client_session

PYTHON_ENV = "DISAGG_VLLM_PYTHON"
MODEL_CACHE_ENV = "DISAGG_MODEL_CACHE"
# Requests with fewer uncached prompt tokens than this (EPP estimate, ~4 characters a
# token) are decode-only; the long prompts here are ~220 tokens, the short ones ~2.
NON_CACHED_TOKENS = 32
# Two busy engines on a small shared VM starve every other process for seconds at a
# time (CI has seen 25 s); no timer on the request path may take that for a failure.
STALL_S = 60
# A real engine's /metrics costs it 20-40 ms of API-server CPU here; the default 50 ms
# scrape interval would keep two engines on a small machine busy serving scrapes.
EPP_ARGS = [
    "--refresh-metrics-interval=500ms",
    "--metrics-staleness-threshold=5s",
    f"--decision-timeout={STALL_S}s",
]
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(PYTHON_ENV):
        return
    skip = pytest.mark.skip(reason=f"real vLLM end-to-end: run ./dev e2e (or set {PYTHON_ENV})")
    for item in items:
        if item.get_closest_marker("vllm_e2e") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_python() -> str:
    python = os.environ.get(PYTHON_ENV, "")
    if not python or not os.access(python, os.X_OK):
        pytest.fail(f"{PYTHON_ENV}={python!r} is not an executable python")
    return python


@pytest.fixture(scope="session")
def tiny_model(vllm_python: str) -> Path:
    """The generated model directory (built once, then cached by content digest)."""
    cmd = [vllm_python, str(_HERE / "tiny_model.py")]
    if os.environ.get(MODEL_CACHE_ENV):
        cmd += ["--cache-dir", os.environ[MODEL_CACHE_ENV]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        pytest.fail(f"tiny model generation failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@dataclass
class RealPd:
    """The whole path: Envoy -> EPP -> sidecar -> decode engine, prefill engine beside."""

    prefill: VllmEngine
    decode: VllmEngine
    stack: LocalStack
    session: aiohttp.ClientSession


@contextlib.asynccontextmanager
async def running_pd(
    vllm_python: str,
    tiny_model: Path,
    workdir: Path,
    *,
    kv_transfer_config: Mapping[str, Any] = KV_TRANSFER_CONFIG,
    kv_connector: str = "nixlv2",
) -> AsyncIterator[RealPd]:
    """A prefill and a decode engine with ``kv_transfer_config``, and the stack in front
    whose sidecar speaks ``kv_connector``; everything is stopped on exit."""
    print(f"engine, sidecar, EPP and Envoy logs: {workdir}")  # shown when a test fails
    cpus = sorted(os.sched_getaffinity(0))
    binds = [str(cpus[0]), str(cpus[1])] if len(cpus) >= 2 else ["auto", "auto"]
    engines = [
        VllmEngine(
            name, vllm_python, tiny_model, workdir, bind, kv_transfer_config=kv_transfer_config
        )
        for name, bind in (("vllm-prefill", binds[0]), ("vllm-decode", binds[1]))
    ]
    prefill, decode = engines
    stack: LocalStack | None = None
    session = client_session()
    try:
        await prefill.start()
        await decode.start()
        for engine in (prefill, decode):
            await engine.wait_healthy(session)
        if kv_transfer_config["kv_connector"] == "NixlConnector":
            await decode.warm_up_nixl(prefill, session)
        stack = LocalStack(
            StackOptions(
                model="tiny",
                gateway_port=0,
                kv_connector=kv_connector,
                prefill_engines=[prefill.host_port],
                decode_engine_ports=[decode.port],
                non_cached_tokens=NON_CACHED_TOKENS,
                epp_args=EPP_ARGS,
                workdir=workdir / "stack",
                epp_ping_timeout_s=STALL_S,
            )
        )
        await stack.start()
        yield RealPd(prefill, decode, stack, session)
    finally:
        if stack is not None:
            await stack.stop()
        await decode.stop()
        await prefill.stop()
        await session.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real_pd(
    vllm_python: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RealPd]:
    """NIXL between the engines, ``nixlv2`` in the sidecar."""
    async with running_pd(vllm_python, tiny_model, tmp_path_factory.mktemp("real-pd")) as pd:
        yield pd
