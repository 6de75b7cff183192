"""Endpoints from a YAML/JSON file in the llm-d shape, optionally re-read on change.

    endpoints:
    - name: decode-0
      namespace: default
      address: 10.0.0.7
      port: "8000"
      labels: {llm-d.ai/role: decode}

The file is read off the event loop; the watch polls its mtime/size/inode. A file that
fails to parse on reload keeps the previous endpoints (logged), so a half-written
file never empties the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from epp.datastore import Datastore, Endpoint

__all__ = ["EndpointEntry", "EndpointsFile", "FileWatcher", "parse_endpoints_file"]

log = logging.getLogger(__name__)


class EndpointEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    namespace: str = "default"
    address: str = Field(min_length=1)
    port: int = Field(gt=0, lt=65536)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("port", mode="before")
    @classmethod
    def _port_from_string(cls, value: object) -> object:
        # llm-d writes ports as strings; ints are accepted too.
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return value

    def to_endpoint(self) -> Endpoint:
        return Endpoint(
            name=self.name,
            namespace=self.namespace,
            address=self.address,
            port=self.port,
            labels=dict(self.labels),
        )


class EndpointsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: list[EndpointEntry] = Field(default_factory=list)


def parse_endpoints_file(text: str, source: str = "<text>") -> list[Endpoint]:
    """Parse the file's text; ``ValueError`` naming the source and the bad field."""
    try:
        doc = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {exc}") from None
    try:
        parsed = EndpointsFile.model_validate(doc or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(f"{source}: {problems}") from None
    return [entry.to_endpoint() for entry in parsed.endpoints]


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


class FileWatcher:
    """Loads the file into the datastore and, if ``watch``, reloads it on change."""

    def __init__(
        self,
        path: str,
        *,
        watch: bool = False,
        interval_s: float = 1.0,
        source: str | None = None,
        on_reload: Callable[[int], None] | None = None,
    ) -> None:
        self.path = path
        self.watch = watch
        self.interval_s = interval_s
        self.source = source or f"file:{path}"
        self.on_reload = on_reload
        self._task: asyncio.Task[None] | None = None
        self._last: tuple[int, int, int] | None = None
        self.reloads = 0
        self.reload_errors = 0

    async def start(self, datastore: Datastore) -> None:
        """Load the file once (``ConfigError`` if unreadable or invalid), then watch."""
        # Imported here: epp.config builds plugins, and this module is one of their parts.
        from epp.config import ConfigError

        try:
            self._last = await asyncio.to_thread(_stat_key, self.path)
            text = await asyncio.to_thread(_read, self.path)
            endpoints = parse_endpoints_file(text, self.path)
        except OSError as exc:
            raise ConfigError(f"endpoints file {self.path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ConfigError(f"endpoints file {exc}") from None
        datastore.replace_source(self.source, endpoints)
        if self.watch:
            self._task = asyncio.create_task(self._watch(datastore), name=self.source)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self, datastore: Datastore) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            key = await asyncio.to_thread(_stat_key, self.path)
            if key is None or key == self._last:
                continue
            self._last = key
            try:
                text = await asyncio.to_thread(_read, self.path)
                endpoints = parse_endpoints_file(text, self.path)
            except (OSError, ValueError) as exc:
                self.reload_errors += 1
                log.warning("keeping previous endpoints; reload failed: %s", exc)
                continue
            datastore.replace_source(self.source, endpoints)
            self.reloads += 1
            log.info("reloaded %s: %d endpoints", self.path, len(endpoints))
            if self.on_reload is not None:
                self.on_reload(len(endpoints))
