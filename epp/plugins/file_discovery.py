"""file-discovery: endpoints from a file in the llm-d shape, optionally watched."""

from __future__ import annotations

from pydantic import Field

from epp.datastore import Datastore
from epp.discovery.file import FileWatcher
from epp.plugins.base import Discovery, PluginParams
from epp.plugins.registry import register

__all__ = ["FileDiscovery"]


@register
class FileDiscovery(Discovery):
    type_name = "file-discovery"

    class Params(PluginParams):
        path: str = Field(min_length=1)
        watch_file: bool = False
        # How often a watched file's mtime is checked.
        watch_interval_seconds: float = Field(default=1.0, gt=0)

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        if params is None:
            raise ValueError("file-discovery needs parameters.path")
        super().__init__(params, name)
        self.watcher = FileWatcher(
            self.params.path,
            watch=self.params.watch_file,
            interval_s=self.params.watch_interval_seconds,
            source=f"{self.type_name}:{self.name}",
        )

    async def start(self, datastore: Datastore) -> None:
        await self.watcher.start(datastore)

    async def stop(self) -> None:
        await self.watcher.stop()
