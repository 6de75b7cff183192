"""The Dockerfile: its builder stage replayed in a fresh environment, its final stage
checked for what the image must be (slim base, no build steps, non-root)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.dockerfile import Stage, expand, parse_dockerfile, parse_env, replay_stage

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def _stages() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _ignored() -> frozenset[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def _stage_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage.instructions:
        if ins.keyword == "ENV":
            env.update({k: expand(v, env) for k, v in parse_env(ins.args).items()})
    return env


def test_two_stages_on_the_slim_python_base() -> None:
    global_args, stages = _stages()
    assert [s.name for s in stages] == ["builder", None]
    assert global_args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert {s.base for s in stages} == {"python:3.11-slim"}


def test_final_stage_is_non_root_and_runs_no_build_steps() -> None:
    _, (builder, final) = _stages()
    keywords = [ins.keyword for ins in final.instructions]
    # No RUN at all: nothing is compiled or installed in the final stage.
    assert "RUN" not in keywords
    users = [ins.args for ins in final.instructions if ins.keyword == "USER"]
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    # Numeric, so Kubernetes runAsNonRoot can verify it without an /etc/passwd entry.
    assert uid.isdigit() and int(uid) != 0
    assert gid.isdigit() and int(gid) != 0
    venv = _stage_env(builder)["VENV"]
    copies = [ins.args.split() for ins in final.instructions if ins.keyword == "COPY"]
    assert copies == [["--from=builder", venv, venv]]
    final_env = _stage_env(final)
    assert final_env["VENV"] == venv
    assert final_env["PATH"].split(":")[0] == f"{venv}/bin"


def test_run_lines_use_variables_for_container_paths() -> None:
    # The replay maps container paths through ENV values; a literal path in a RUN line
    # would escape that mapping and make the replay unfaithful.
    _, (builder, _final) = _stages()
    for ins in builder.instructions:
        if ins.keyword != "RUN":
            continue
        command = ins.args
        while command.startswith("--mount="):
            command = command.partition(" ")[2]
        for token in command.split():
            assert not token.strip("\"'").startswith("/"), (ins.line, token)


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    ignored = _ignored()
    assert {".git", ".venv", "tests"} <= ignored
    _, (builder, _final) = _stages()
    for ins in builder.instructions:
        if ins.keyword == "COPY":
            for source in ins.args.split()[:-1]:
                assert source.split("/")[0] not in ignored, source
                assert (REPO / source).exists(), source


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_builder_stage_replays_and_both_entry_points_run(tmp_path: Path) -> None:
    _, (builder, final) = _stages()
    # The image's interpreter: a fresh environment on this machine's base Python 3.11,
    # with only the pip that ships with it (the project's venv is not used).
    image_python = tmp_path / "image-python"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(image_python)], check=True)
    root = tmp_path / "root"
    root.mkdir()
    env = replay_stage(
        builder,
        context=REPO,
        root=root,
        python_bin=image_python / "bin" / "python",
        ignored=_ignored(),
    )
    venv = Path(env["VENV"])
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sys; print(sys.prefix)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(installed.stdout.strip()) == venv
    # Runtime dependencies only: no pip, no test or lint tooling.
    (site,) = venv.glob("lib/python*/site-packages")
    for tool in ("pip", "pytest", "mypy", "ruff", "setuptools"):
        assert not (site / tool).exists(), tool
    for package in ("common", "sidecar", "epp", "vllm_sim"):
        assert (site / package / "__init__.py").exists(), package
    for script, expected in (("pd-sidecar", "--model-server-port"), ("epp", "--pool-name")):
        result = subprocess.run(
            [str(venv / "bin" / script), "--help"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, (script, result.stderr)
        assert expected in result.stdout, (script, result.stdout)
    # The final stage's command is one of those entry points.
    cmds = [ins.args for ins in final.instructions if ins.keyword == "CMD"]
    assert cmds and cmds[-1].startswith('["pd-sidecar"')
