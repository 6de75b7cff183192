"""Every vLLM engine's command line parses with vLLM's own argument parser.

vLLM validates ``--kv-transfer-config`` and ``--ec-transfer-config`` strictly (unknown
keys are errors), so this catches connector options that drifted between vLLM releases.
It needs the pinned vLLM CPU environment, which ``./dev e2e`` builds and names in
``DISAGG_VLLM_PYTHON``; without it the test is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.deploy.kube import build, containers, kustomizations, resolve_args

_PARSE = """
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser

results = {}
for where, argv in json.load(open(sys.argv[1])).items():
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve", exit_on_error=False))
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        results[where] = f"exit {exc.code}"
    except Exception as exc:
        results[where] = f"{type(exc).__name__}: {exc}"
    else:
        results[where] = "ok"
print(json.dumps(results))
"""


def _engine_commands() -> dict[str, list[str]]:
    commands: dict[str, list[str]] = {}
    for directory in kustomizations():
        built = build(directory)
        for container in containers(built):
            if container.spec.get("command") == ["vllm", "serve"]:
                commands[f"{directory}: {container.where}"] = resolve_args(built, container)
    return commands


def test_every_engine_runs_vllm_serve() -> None:
    commands = _engine_commands()
    assert commands
    engines = [c.where for d in kustomizations() for c in containers(build(d)) if c.name == "vllm"]
    assert len(engines) == len(commands)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engine_args_parse_with_vllm(tmp_path: Path) -> None:
    python = os.environ.get("DISAGG_VLLM_PYTHON")
    if not python:
        pytest.skip("DISAGG_VLLM_PYTHON is not set (./dev e2e builds the vLLM environment)")
    commands = _engine_commands()
    # A bad option must be reported as such, or an all-"ok" answer would prove nothing.
    control = "control: unknown kv_transfer_config key"
    commands[control] = ['--kv-transfer-config={"kv_connector":"NixlConnector","kv_rol":"x"}']
    (tmp_path / "commands.json").write_text(json.dumps(commands), encoding="utf-8")
    (tmp_path / "parse.py").write_text(_PARSE, encoding="utf-8")
    result = subprocess.run(
        [python, str(tmp_path / "parse.py"), str(tmp_path / "commands.json")],
        capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    verdicts = json.loads(result.stdout.strip().splitlines()[-1])
    assert verdicts.pop(control) != "ok"
    assert verdicts == dict.fromkeys(verdicts, "ok"), {
        k: v for k, v in verdicts.items() if v != "ok"
    }
    assert set(verdicts) == set(commands) - {control}
