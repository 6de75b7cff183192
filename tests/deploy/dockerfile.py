"""A small Dockerfile reader and a replay of one stage on this machine.

There is no container engine here, so the image's install steps are checked by running
them: the stage's ``ENV``, ``WORKDIR``, ``COPY`` (from the build context) and ``RUN``
instructions execute in order, with every absolute container path moved under a
scratch directory. Only what the project's Dockerfile uses is supported; anything else
is an error rather than a silent skip, so the replay cannot drift from the file.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Instruction", "Stage", "parse_dockerfile", "replay_stage"]

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations; drop comments and blank lines."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        out.append((start, " ".join(part for part in buf if part)))
        buf = []
    if buf:
        raise ValueError(f"line {start}: instruction ends with a line continuation")
    return out


def expand(text: str, env: Mapping[str, str]) -> str:
    """Dockerfile ``$VAR`` / ``${VAR}`` substitution (unknown variables are an error)."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in env:
            raise ValueError(f"undefined variable ${name} in {text!r}")
        return env[name]

    return _VAR.sub(sub, text)


def parse_env(args: str) -> dict[str, str]:
    """``ENV a=1 b="two words"`` (the ``key=value`` form only)."""
    values: dict[str, str] = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        if not sep:
            raise ValueError(f"ENV {args!r}: use the key=value form")
        values[key] = value
    return values


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ``ARG`` defaults and the stages, each with its instructions."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, instruction in _logical_lines(text):
        keyword, _, args = instruction.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = None
            if len(parts) == 3 and parts[1].upper() == "AS":
                name = parts[2]
            elif len(parts) != 1:
                raise ValueError(f"line {line}: unsupported FROM {args!r}")
            stages.append(Stage(expand(parts[0], global_args), name))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"line {line}: {keyword} before the first FROM")
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args, line))
    return global_args, stages


def _strip_run_flags(args: str) -> str:
    # BuildKit flags such as --mount=type=cache only change caching, not the result.
    while args.startswith("--"):
        flag, _, args = args.partition(" ")
        if not flag.startswith("--mount="):
            raise ValueError(f"unsupported RUN flag {flag}")
        args = args.lstrip()
    return args


def replay_stage(
    stage: Stage,
    *,
    context: Path,
    root: Path,
    python_bin: Path,
    ignored: frozenset[str] = frozenset(),
    timeout_s: float = 600,
) -> dict[str, str]:
    """Run ``stage`` with container path ``/x`` mapped to ``root/x``.

    ``python`` in RUN lines is ``python_bin``. Returns the stage's final ENV (mapped).
    """
    env: dict[str, str] = {}
    workdir = "/"

    def host(path: str) -> Path:
        absolute = path if path.startswith("/") else os.path.join(workdir, path)
        return root / os.path.normpath(absolute).lstrip("/")

    bin_dir = root.parent / "replay-bin"
    bin_dir.mkdir(exist_ok=True)
    # A wrapper, not a symlink: a symlinked venv interpreter would not find its venv.
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{python_bin}" "$@"\n', encoding="utf-8")
    wrapper.chmod(0o755)

    for ins in stage.instructions:
        if ins.keyword == "ENV":
            for key, value in parse_env(ins.args).items():
                value = expand(value, env)
                env[key] = str(host(value)) if value.startswith("/") else value
        elif ins.keyword == "WORKDIR":
            workdir = os.path.join(workdir, expand(ins.args, env))
            host(workdir).mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            parts = shlex.split(ins.args)
            if any(p.startswith("--") for p in parts):
                raise ValueError(f"line {ins.line}: COPY flags are not replayed")
            *sources, dest = parts
            for source in sources:
                if source.split("/")[0] in ignored:
                    raise ValueError(f"line {ins.line}: {source} is excluded by .dockerignore")
                src = context / source
                if src.is_dir():
                    target = host(dest)
                    shutil.copytree(
                        src, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    )  # fmt: skip
                else:
                    target = host(dest)
                    if dest.endswith("/"):
                        target.mkdir(parents=True, exist_ok=True)
                        target = target / src.name
                    shutil.copy2(src, target)
        elif ins.keyword == "RUN":
            command = _strip_run_flags(ins.args)
            run_env = {**os.environ, **env}
            run_env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
            run_env.pop("VIRTUAL_ENV", None)
            subprocess.run(
                ["bash", "-euo", "pipefail", "-c", command],
                cwd=host(workdir),
                env=run_env,
                check=True,
                timeout=timeout_s,
            )
        elif ins.keyword in ("LABEL", "EXPOSE", "CMD", "ENTRYPOINT", "USER"):
            continue  # metadata: checked by the tests, nothing to run
        else:
            raise ValueError(f"line {ins.line}: {ins.keyword} is not replayed")
    return env
