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

import logging
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from common.yaml_file import WatchedFile, parse_yaml_model
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
    parsed = parse_yaml_model(text, AllowlistFile, source)
    return Members(
        Member(entry.host, frozenset(entry.ports), frozenset(entry.roles)) for entry in parsed.allow
    )


class AllowlistSource:
    """The allowlist file as a :class:`~sidecar.ssrf.guard.MemberSource`."""

    def __init__(self, path: str, *, interval_s: float = 2.0) -> None:
        self.path = path
        self.description = f"allowlist file {path}"
        self._members: Members | None = None
        self._file = WatchedFile(
            path,
            lambda text: parse_allowlist(text, path),
            interval_s=interval_s,
            on_change=self._apply,
            on_error=lambda exc: log.warning(
                {"event": "ssrf_allowlist_reload_failed", "error": str(exc)}
            ),
        )

    @property
    def reloads(self) -> int:
        return self._file.reloads

    @property
    def reload_errors(self) -> int:
        return self._file.reload_errors

    async def start(self) -> None:
        """Load once (``ValueError`` when unreadable or invalid), then poll for changes."""
        try:
            self._members = await self._file.load()
        except OSError as exc:
            raise ValueError(f"{self.path}: {exc.strerror or exc}") from None
        self._file.watch(self.description)

    async def stop(self) -> None:
        await self._file.stop()

    def members(self) -> Members | None:
        return self._members

    def _apply(self, members: Members) -> None:
        self._members = members
        log.info({"event": "ssrf_allowlist_reloaded", "path": self.path, "hosts": len(members)})
