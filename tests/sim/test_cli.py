"""The ``vllm-sim`` console script as users run it."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from vllm_sim.__main__ import parse_args


def sim_command() -> list[str]:
    script = shutil.which("vllm-sim", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "vllm_sim"]


def test_flags_map_to_config() -> None:
    config = parse_args(
        [
            "--port",
            "9001",
            "--model",
            "tiny",
            "--zero-latency",
            "--kv-load-failure-policy",
            "recompute",
            "--block-size",
            "32",
            "--fault",
            '{"kind": "hang"}',
        ]
    )
    assert config.port == 9001
    assert config.served_model_name == "tiny"
    assert config.zero_latency is True
    assert config.kv_load_failure_policy == "recompute"
    assert config.block_size == 32
    assert config.faults == ('{"kind": "hang"}',)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--block-size", "0"], "--block-size"),
        (["--kv-load-failure-policy", "maybe"], "kv-load-failure-policy"),
        (["--zero-latency=perhaps"], "zero-latency"),
    ],
)
def test_bad_flags_exit_2_naming_the_field(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


async def test_console_script_serves_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        *sim_command(),
        "--port",
        "0",
        "--zero-latency",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = re.search(r"on (http://\S+)", line)
        assert match, line
        url = match.group(1)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/health") as resp:
                assert resp.status == 200
            body = {"prompt": "hi there", "max_tokens": 2}
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                assert (await resp.json())["usage"]["completion_tokens"] == 2
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
