"""Members from a static allowlist file (YAML or JSON), for clusters without a pool.

Shape::

    allow:
      - host: 10.0.0.7            # an IP address or a DNS name, as the EPP writes it
        ports: [8000]             # the ports it may be reached on (at least one)
        roles: [prefill]          # llm-d.ai/role values: prefill, encode, both, ...
      - host: encoder-0.encoders.svc
        ports: [8000, 8001]
        roles: [encode]

Unknown keys are errors. The file is read off the event loop at start (an unreadable or
invalid file stops start-up) and polled for changes; a reload that fails to parse keeps
the previous allowlist and is logged, so a half-written file never opens or empties it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sidecar.ssrf.rules import Member, Members

__all__ = ["AllowlistEntry", "AllowlistFile", "AllowlistSource", "parse_allowlist"]

log = logging.getLogger("pd_sidecar.ssrf")

_Port = Annotated[int, Field(gt=0, lt=65536)]


class AllowlistEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1)
    ports: list[_Port] = Field(min_length=1)
    roles: list[str] = Field(default_factory=list)


class AllowlistFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allow: list[AllowlistEntry] = Field(default_factory=list)


def parse_allowlist(text: str, source: str = "<text>") -> Members:
    """Parse the file's text; ``ValueError`` naming the source and the bad field."""
    try:
        doc = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML or JSON: {exc}") from None
    try:
        parsed = AllowlistFile.model_validate(doc or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(f"{source}: {problems}") from None
    return Members(
        Member(entry.host, frozenset(entry.ports), frozenset(entry.roles)) for entry in parsed.allow
    )


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read(path: str) -> tuple[tuple[int, int, int] | None, str]:
    key = _stat_key(path)
    with open(path, encoding="utf-8") as f:
        return key, f.read()


class AllowlistSource:
    """The allowlist file as a :class:`~sidecar.ssrf.guard.MemberSource`."""

    def __init__(self, path: str, *, interval_s: float = 2.0) -> None:
        self.path = path
        self.description = f"allowlist file {path}"
        self.interval_s = interval_s
        self.reloads = 0
        self.reload_errors = 0
        self._members: Members | None = None
        self._last: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load once (``ValueError`` when unreadable or invalid), then poll for changes."""
        try:
            self._last, text = await asyncio.to_thread(_read, self.path)
        except OSError as exc:
            raise ValueError(f"{self.path}: {exc.strerror or exc}") from None
        self._members = parse_allowlist(text, self.path)
        self._task = asyncio.create_task(self._watch(), name=self.description)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def members(self) -> Members | None:
        return self._members

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            key = await asyncio.to_thread(_stat_key, self.path)
            if key is None or key == self._last:
                continue
            try:
                key, text = await asyncio.to_thread(_read, self.path)
                members = parse_allowlist(text, self.path)
            except (OSError, ValueError) as exc:
                self._last = key
                self.reload_errors += 1
                log.warning({"event": "ssrf_allowlist_reload_failed", "error": str(exc)})
                continue
            self._last = key
            self._members = members
            self.reloads += 1
            log.info({"event": "ssrf_allowlist_reloaded", "path": self.path, "hosts": len(members)})
