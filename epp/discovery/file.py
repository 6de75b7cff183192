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

import logging
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.yaml_file import WatchedFile, parse_yaml_model
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
    parsed = parse_yaml_model(text, EndpointsFile, source)
    return [entry.to_endpoint() for entry in parsed.endpoints]


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
        self.source = source or f"file:{path}"
        self.on_reload = on_reload
        self._datastore: Datastore | None = None
        self._file = WatchedFile(
            path,
            lambda text: parse_endpoints_file(text, path),
            interval_s=interval_s,
            on_change=self._apply,
            on_error=lambda exc: log.warning("keeping previous endpoints; reload failed: %s", exc),
        )

    @property
    def reloads(self) -> int:
        return self._file.reloads

    @property
    def reload_errors(self) -> int:
        return self._file.reload_errors

    async def start(self, datastore: Datastore) -> None:
        """Load the file once (``ConfigError`` if unreadable or invalid), then watch."""
        # Imported here: epp.config builds plugins, and this module is one of their parts.
        from epp.config import ConfigError

        try:
            endpoints = await self._file.load()
        except OSError as exc:
            raise ConfigError(f"endpoints file {self.path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ConfigError(f"endpoints file {exc}") from None
        self._datastore = datastore
        datastore.replace_source(self.source, endpoints)
        if self.watch:
            self._file.watch(self.source)

    async def stop(self) -> None:
        await self._file.stop()

    def _apply(self, endpoints: list[Endpoint]) -> None:
        assert self._datastore is not None
        self._datastore.replace_source(self.source, endpoints)
        log.info("reloaded %s: %d endpoints", self.path, len(endpoints))
        if self.on_reload is not None:
            self.on_reload(len(endpoints))
