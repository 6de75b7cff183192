"""``--api-objects-file``: InferenceObjective and InferenceModelRewrite objects from a
multi-document YAML file, re-read when it changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import yaml

from epp.requestmgmt.objects import ObjectiveSpec, ObjectStore, RewriteSpec, parse_object

__all__ = ["ObjectsFile", "read_objects"]

log = logging.getLogger(__name__)


def read_objects(path: Path) -> list[ObjectiveSpec | RewriteSpec]:
    """Every object in the file; ``ValueError`` naming the file and document at fault."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--api-objects-file {path}: {exc.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ValueError(f"--api-objects-file {path}: not valid YAML: {exc}") from None
    out: list[ObjectiveSpec | RewriteSpec] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ValueError(f"--api-objects-file {path}: document {i}: expected a mapping")
        items = (doc.get("items") or []) if doc.get("kind") == "List" else [doc]
        for item in items:
            out.append(parse_object(item, f"--api-objects-file {path}: document {i}: "))
    return out


class ObjectsFile:
    SOURCE = "file"

    def __init__(self, path: str | Path, store: ObjectStore, poll_s: float = 1.0) -> None:
        self.path = Path(path)
        self.store = store
        self.poll_s = poll_s
        self._stamp: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.loads = 0

    def _current_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> None:
        """Read now; ``ValueError`` when the file is missing or invalid."""
        stamp = self._current_stamp()
        objects = read_objects(self.path)
        self.store.replace(self.SOURCE, objects)
        self._stamp = stamp
        self.loads += 1
        log.info("api objects file %s: %d objects", self.path, len(objects))

    async def start(self) -> None:
        if self._stamp is None:
            from epp.config import ConfigError

            try:
                await asyncio.to_thread(self.load)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        self._task = asyncio.create_task(self._watch(), name="api objects file")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            stamp = self._current_stamp()
            if stamp is None or stamp == self._stamp:
                continue
            try:
                await asyncio.to_thread(self.load)
            except ValueError as exc:
                self._stamp = stamp  # report each bad version once
                log.error("%s; keeping the objects loaded before", exc)
